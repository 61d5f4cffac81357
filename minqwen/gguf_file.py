"""Reading llama.cpp's GGUF files: metadata -> Qwen2Config, quantised tensors -> HF state dict.

A GGUF file holds key/value metadata (architecture, sizes, the tokenizer), then tensors named
the llama.cpp way (``blk.3.attn_q.weight``), most of them quantised in blocks (Q4_K, Q5_0, Q6_K,
Q8_0 ...). The ``gguf`` package parses the file and dequantises blocks; this module maps names
and metadata to Hugging Face's, and :func:`convert_gguf` writes the result as an HF-format
directory so that later loads are a plain memory-mapped safetensors read.

Qwen2's converter in llama.cpp does not permute the rows of Q and K (only the Llama converter
does), so the rows are used as stored; the real-weights tests prove it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .config import Qwen2Config
from .tokenizer import tokenizer_files_from_gguf
from .weights import check_state_dict

# llama.cpp name -> HF name, for tensors outside the blocks and for the parts of a block.
TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
BLOCK_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str) -> str:
    """``blk.3.attn_q.bias`` -> ``model.layers.3.self_attn.q_proj.bias`` (ValueError if unknown)."""
    if match := BLOCK_PATTERN.fullmatch(gguf_name):
        layer, part, kind = match.groups()
        if part in BLOCK_NAMES:
            return f"model.layers.{layer}.{BLOCK_NAMES[part]}.{kind}"
    else:
        stem, _, kind = gguf_name.rpartition(".")
        if stem in TOP_LEVEL_NAMES and kind == "weight":
            return f"{TOP_LEVEL_NAMES[stem]}.weight"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no Qwen2 counterpart")


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` for a Qwen2 file; errors name the file (and the architecture)."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(path)
    except Exception as e:  # the reader raises many kinds on truncated or foreign files
        raise ValueError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    arch = field_value(reader, "general.architecture")
    if arch != "qwen2":
        raise ValueError(f"{path}: GGUF architecture is {arch!r}, minqwen loads only 'qwen2'")
    return reader


def field_value(reader, key: str, default: Any = None) -> Any:
    """A metadata value as a plain Python value (str, number, list), or ``default``."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def config_from_gguf(reader) -> Qwen2Config:
    """The Qwen2 config recorded in the ``qwen2.*`` (and ``tokenizer.ggml.*``) metadata."""
    get = lambda key, default=None: field_value(reader, f"qwen2.{key}", default)  # noqa: E731
    tensor_names = {t.name for t in reader.tensors}
    vocab_size = len(field_value(reader, "tokenizer.ggml.tokens", [])) or int(
        next(t.shape[1] for t in reader.tensors if t.name == "token_embd.weight")
    )
    eos_ids = [field_value(reader, "tokenizer.ggml.eos_token_id"), field_value(reader, "tokenizer.ggml.padding_token_id")]
    eos_ids = list(dict.fromkeys(i for i in eos_ids if i is not None))  # eos first, then <|endoftext|>
    hidden_size = get("embedding_length")
    heads = get("attention.head_count")
    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=get("attention.head_count_kv", heads),
        max_position_embeddings=get("context_length", 32768),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_scaling=rope_scaling_from_gguf(reader),
        tie_word_embeddings="output.weight" not in tensor_names,
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=get("block_count"),
        bos_token_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        torch_dtype="float32",
    )


def rope_scaling_from_gguf(reader) -> dict[str, Any] | None:
    """``qwen2.rope.scaling.*`` keys as an HF ``rope_scaling`` dict (None when absent or "none")."""
    kind = field_value(reader, "qwen2.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(field_value(reader, "qwen2.rope.scaling.factor", 1.0))}
    original = field_value(reader, "qwen2.rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def tokenizer_metadata(reader) -> dict[str, Any]:
    """Every ``tokenizer.*`` metadata key with its plain Python value."""
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


def dequantize_tensor(tensor) -> np.ndarray:
    """One GGUF tensor as float32 numpy in HF layout (out_features, in_features)."""
    from gguf.quants import dequantize

    values = dequantize(tensor.data, tensor.tensor_type)
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dims fastest-first
    return np.array(values, dtype=np.float32).reshape(shape)  # a writable copy, not a view of the file


def read_gguf_state_dict(reader, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """All tensors, dequantised and renamed to HF's state-dict keys."""
    state_dict = {}
    for tensor in tqdm(reader.tensors, desc="dequantise GGUF", unit="tensor"):
        state_dict[hf_tensor_name(tensor.name)] = torch.from_numpy(dequantize_tensor(tensor)).to(dtype)
    return state_dict


def convert_gguf(path: str | Path, out_dir: str | Path) -> None:
    """Write a Qwen2 GGUF as an HF-format directory: config.json, model.safetensors, tokenizer files.

    Weights are stored in float32: dequantised values are exact there, so every later load in
    any dtype starts from the same numbers.
    """
    out_dir = Path(out_dir)
    reader = open_gguf(path)
    config = config_from_gguf(reader)
    state_dict = read_gguf_state_dict(reader)
    check_state_dict(config, state_dict, source=str(path))
    config.extra["minqwen_source"] = Path(path).name
    config.to_json(out_dir / "config.json")
    save_file(state_dict, out_dir / "model.safetensors", metadata={"format": "pt"})
    for name, text in tokenizer_files_from_gguf(tokenizer_metadata(reader)).items():
        (out_dir / name).write_text(text, encoding="utf-8")
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}, indent=2) + "\n"
    )
