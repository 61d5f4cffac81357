"""Shared test helpers: tiny random configs, randomised weights and HF twins of minqwen models."""

from __future__ import annotations

import pytest
import torch

import minqwen
from minqwen import Qwen2Config, Qwen2ForCausalLM

# Tolerances by dtype, in one place (max abs difference allowed vs HF).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 5e-2}


def tiny_config(heads: int = 4, kv_heads: int = 2, tied: bool = False, head_size: int = 8, **overrides) -> Qwen2Config:
    """A two-layer Qwen2 small enough to run in milliseconds."""
    fields = dict(
        vocab_size=257,
        hidden_size=heads * head_size,
        intermediate_size=56,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tied,
    )
    fields.update(overrides)
    return Qwen2Config(**fields)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values -- norms and biases too, since zeros hide bugs."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in module.named_parameters():
        noise = torch.randn(param.shape, generator=generator) * 0.2
        param.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    return module


def random_model(config: Qwen2Config, seed: int = 0, attn_implementation: str = "sdpa") -> Qwen2ForCausalLM:
    """A minqwen model with randomised weights, in eval mode."""
    torch.manual_seed(seed)
    return randomize_(Qwen2ForCausalLM(config, attn_implementation), seed).eval()


def tiny_model_with_qwen_vocab(seed: int = 0, **overrides) -> Qwen2ForCausalLM:
    """A tiny random model over the real tokenizer's ids (151,665) with Qwen's stop ids.

    Chat, streaming and CLI plumbing run on it in milliseconds with real text in and out.
    """
    fields = dict(vocab_size=151665, eos_token_id=[151645, 151643], max_position_embeddings=4096)
    return random_model(tiny_config(**{**fields, **overrides}), seed)


def hf_config(config: Qwen2Config, attn_implementation: str = "eager"):
    """The same config as a ``transformers.Qwen2Config``."""
    import transformers

    hf = transformers.Qwen2Config(**config.to_dict())
    hf._attn_implementation = attn_implementation
    return hf


def hf_twin(model: Qwen2ForCausalLM, attn_implementation: str = "eager"):
    """An HF ``Qwen2ForCausalLM`` holding exactly ``model``'s weights (same state-dict keys)."""
    import transformers

    hf = transformers.Qwen2ForCausalLM(hf_config(model.config, attn_implementation)).eval()
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.to(model.lm_head.weight.dtype)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    """Max-abs comparison with the dtype's tolerance; the message shows the worst element."""
    tol = TOLERANCE[dtype]
    diff = (actual.float() - expected.float()).abs()
    worst = int(diff.argmax())
    assert diff.max() <= tol, (
        f"max abs diff {diff.max():.3e} > {tol:.0e} at flat index {worst}: "
        f"got {actual.flatten()[worst]:.6f}, expected {expected.flatten()[worst]:.6f}"
    )


__all__ = ["TOLERANCE", "tiny_config", "randomize_", "random_model", "tiny_model_with_qwen_vocab", "hf_config", "hf_twin", "assert_close", "minqwen"]


def assert_exercise_check(check, right, wrong, capsys, *inputs, match: str | None = None) -> None:
    """An exercise check accepts ``right``, answers an unfinished stub with "not done yet", and
    raises an AssertionError (with ``match`` in it, when given) for ``wrong``. ``inputs`` follow the answer."""

    def stub(*args):
        raise NotImplementedError

    assert check(right, *inputs) is True
    assert "correct!" in capsys.readouterr().out
    assert check(stub, *inputs) is False
    out = capsys.readouterr().out
    assert "not done yet" in out and "correct!" not in out
    with pytest.raises(AssertionError, match=match):
        check(wrong, *inputs)
