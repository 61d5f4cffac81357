"""Fixtures shared by every test file, and the ``real`` marker.

``real`` marks a test that needs the real weights of the default checkpoint (fetched and cached
once). It is added automatically here, so test files need not remember it, to every test that

- uses one of ``REAL_FIXTURES`` (directly or through another fixture), or
- whose own code, or the code of a fixture it uses, names the default checkpoint
  (``DEFAULT_CHECKPOINT``), or
- is listed in ``REAL_BY_NODE_ID`` (the few that reach the real weights some other way).

Every other test runs with the minqwen cache in its own temporary directory and with downloads
switched off, so ``pytest -m "not real"`` (``make test-fast``) never touches the network or the
shared cache, and a test that needs the real weights without being marked fails loudly instead.
Those tests also run PyTorch on one thread (their subprocesses too): on millisecond-sized tiny
models a second thread costs more in synchronisation than it gives, up to 10x on a busy machine.
"""

import inspect
import shutil
import sys
from pathlib import Path

# Make `import helpers` work from any test file without installing the tests as a package.
sys.path.insert(0, str(Path(__file__).parent))

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import save_tiny_checkpoint  # noqa: E402

CACHE_ENV = "MINQWEN_CACHE"  # documented in the README; the code that reads it may move
REAL_FIXTURES = {"real_gguf_path", "real_model_fp32", "hf_real_model"}
REAL_NAMES_IN_SOURCE = ("DEFAULT_CHECKPOINT",)
REAL_BY_NODE_ID = {  # node id -> why it needs the real weights
    "tests/test_cli.py::test_real_model_continues_the_prompt": "runs `python -m minqwen` on its default checkpoint",
    "tests/test_cli.py::test_real_model_chat_answers": "runs `python -m minqwen chat` on its default checkpoint",
    "tests/test_long_context_real.py::test_passkey_command_finds_the_key_across_dca_chunks": "passkey's default checkpoint",
}


def _names_the_default_checkpoint(function) -> bool:
    try:
        source = inspect.getsource(function)
    except (OSError, TypeError):
        return False
    return any(name in source for name in REAL_NAMES_IN_SOURCE)


def needs_real_weights(item: pytest.Item) -> bool:
    """Whether ``item`` reaches the real checkpoint (see the module docstring)."""
    if item.nodeid.split("[")[0] in REAL_BY_NODE_ID or item.get_closest_marker("real"):
        return True
    fixture_names = set(getattr(item, "fixturenames", ()))
    if fixture_names & REAL_FIXTURES:
        return True
    info = getattr(item, "_fixtureinfo", None)
    definitions = [d for defs in (info.name2fixturedefs.values() if info else ()) for d in defs]
    functions = [getattr(item, "function", None)] + [d.func for d in definitions]
    return any(_names_the_default_checkpoint(f) for f in functions if f is not None)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if needs_real_weights(item):
            item.add_marker(pytest.mark.real)


@pytest.fixture(autouse=True)
def _offline_private_cache(request, tmp_path, monkeypatch):
    """Tests not marked ``real``: a private, empty minqwen cache in ``tmp_path / "cache"``, no downloads
    (pip and the HF hub offline) and one thread, in this process and in the subprocesses it starts."""
    if request.node.get_closest_marker("real"):
        yield
        return
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def _tiny_checkpoint_template(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint") / "tiny")


@pytest.fixture
def tiny_checkpoint(_tiny_checkpoint_template, tmp_path):
    """A tiny checkpoint directory of this test's own (a copy it may change), as a ``str`` path.

    HF format (``config.json``, ``model.safetensors``, ``tokenizer.json``, ``tokenizer_config.json``):
    a random six-layer Qwen2 with hidden size 64 over a 262-token byte-level BPE with ChatML
    (``helpers.save_tiny_checkpoint``). Loads with ``minqwen.from_pretrained``,
    ``minqwen.Tokenizer.from_pretrained``, ``python -m minqwen --checkpoint`` and HF transformers.
    """
    return str(shutil.copytree(_tiny_checkpoint_template, tmp_path / "tiny"))


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
