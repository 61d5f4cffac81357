import sys
from pathlib import Path

# Make `import helpers` work from any test file without installing the tests as a package.
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def real_gguf_path():
    """The verified GGUF of the default checkpoint (fetched into the cache on first use)."""
    from minqwen import hub

    return hub.fetch(hub.CHECKPOINTS[hub.DEFAULT_CHECKPOINT])


@pytest.fixture(scope="session")
def real_model_fp32():
    """The real 0.5B model in fp32, loaded once per test session."""
    import minqwen

    return minqwen.from_pretrained(minqwen.hub.DEFAULT_CHECKPOINT)


@pytest.fixture(scope="session")
def hf_real_model(real_gguf_path):
    """transformers' own reading of the same GGUF (its config, names and dequantisation), fp32.

    Built from transformers' GGUF utilities directly: its ``from_pretrained(gguf_file=...)`` would
    also need accelerate, which minqwen does not otherwise use.
    """
    import transformers
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = transformers.Qwen2Config(**load_gguf_checkpoint(str(real_gguf_path))["config"])
    model = transformers.Qwen2ForCausalLM(config).eval()
    tensors = load_gguf_checkpoint(str(real_gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    model.load_state_dict(tensors, strict=True)
    return model
