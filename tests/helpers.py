"""Shared test helpers: tiny random configs, randomised weights, HF twins of minqwen models, and a
tiny checkpoint directory (model + tokenizer) that needs no download."""

from __future__ import annotations

import json
from pathlib import Path

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


# ---------------------------------------------------------------- a tiny checkpoint directory
# A byte-level BPE over the 256 byte symbols, three merges and Qwen's three ChatML tokens: enough for
# encode/decode, streaming, ChatML and chat, written in HF's file format like a real checkpoint's.
TINY_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he")]
TINY_ADDED_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_CHAT_TEMPLATE = (  # Qwen2.5's shape: its default system prompt, then ChatML turns
    "{%- if messages[0]['role'] != 'system' %}{{- '<|im_start|>system\\nYou are a tiny test model.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte 0-255 (``Ġ`` for the space), in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def write_tiny_tokenizer(directory: Path) -> dict[str, int]:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` (Qwen2's pipeline); return the vocabulary, added tokens included."""
    from minqwen.tokenizer import QWEN2_PATTERN

    vocab = {symbol: i for i, symbol in enumerate(byte_symbols())}
    for left, right in TINY_MERGES:
        vocab[left + right] = len(vocab)
    added = {content: len(vocab) + i for i, content in enumerate(TINY_ADDED_TOKENS)}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    added_tokens = [
        {"id": i, "content": c, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
        for c, i in added.items()
    ]
    tokenizer = {
        "version": "1.0",
        "added_tokens": added_tokens,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [{"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False}, byte_level],
        },
        "decoder": byte_level,
        "model": {"type": "BPE", "vocab": vocab, "merges": [f"{a} {b}" for a, b in TINY_MERGES]},
    }
    config = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": TINY_CHAT_TEMPLATE}
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False), encoding="utf-8")
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return {**vocab, **added}


def save_tiny_checkpoint(directory: Path, seed: int = 1) -> Path:
    """An HF-format directory of about 1 MB: a random six-layer Qwen2 (hidden 64, int8-ready; six
    layers so that the README's ``model.layers.5`` exists) over the tiny tokenizer, stopping at
    ``<|im_end|>`` / ``<|endoftext|>`` like Qwen.

    The head's rows for the added tokens are zero, so greedy decoding does not stop at once: a zero
    logit is rarely the largest of 262 random ones, and that margin does not depend on the CPU.
    """
    directory.mkdir(parents=True, exist_ok=True)
    vocab = write_tiny_tokenizer(directory)
    stop_ids = [vocab["<|im_end|>"], vocab["<|endoftext|>"]]
    config = tiny_config(
        hidden_size=64, head_size=16, num_hidden_layers=6, vocab_size=len(vocab), eos_token_id=stop_ids, max_position_embeddings=4096
    )
    model = random_model(config, seed)
    with torch.no_grad():
        model.lm_head.weight[[vocab[t] for t in TINY_ADDED_TOKENS]] = 0
    minqwen.save_pretrained(model, directory)
    return directory


__all__ = ["TOLERANCE", "tiny_config", "randomize_", "random_model", "tiny_model_with_qwen_vocab", "hf_config", "hf_twin", "assert_close", "minqwen", "save_tiny_checkpoint", "write_tiny_tokenizer"]


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
