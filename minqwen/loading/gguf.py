"""Reading llama.cpp's GGUF files: metadata -> Qwen2Config and tokenizer files, tensors -> HF state dict.

A GGUF file holds key/value metadata (architecture, sizes, the tokenizer), then tensors named
the llama.cpp way (``blk.3.attn_q.weight``), most of them quantised in blocks (Q4_K, Q5_0, Q6_K,
Q8_0 ...). The ``gguf`` package parses the file and dequantises blocks; this module maps names
and metadata to Hugging Face's. :func:`convert_gguf` writes the result as an HF-format directory
so that later loads are a plain memory-mapped safetensors read; :func:`write_tokenizer_files`
writes only the tokenizer (``tokenizer.json`` + ``tokenizer_config.json``), which needs only
the metadata.

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

from ..bpe import QWEN2_PATTERN, byte_level_tokenizer_json
from ..config import Qwen2Config
from .weights import SINGLE_FILE, check_state_dict

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
    save_file(state_dict, out_dir / SINGLE_FILE, metadata={"format": "pt"})
    write_tokenizer_files(reader, out_dir)
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}, indent=2) + "\n"
    )


def write_tokenizer_files(reader, out_dir: str | Path) -> None:
    """Write the tokenizer of an open GGUF (:func:`open_gguf`) as tokenizer.json + tokenizer_config.json."""
    for name, text in tokenizer_files_from_gguf(tokenizer_metadata(reader)).items():
        (Path(out_dir) / name).write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- the tokenizer
# GGUF token types (llama.cpp's ``LLAMA_TOKEN_TYPE``): how each vocabulary entry is used.
GGUF_CONTROL = 3  # special token: <|im_start|>, <|endoftext|>, ...
GGUF_USER_DEFINED = 4  # added but not special: <tool_call>, ...
GGUF_UNUSED = 5  # padding rows of the embedding ([PAD151665] ...): no token at all

# The pre-tokeniser names GGUF uses for Qwen2 -> split pattern. (GGUF does not record the
# normalisation; the official Qwen2/2.5 tokenizer.json applies NFC, so the files we write do too.)
GGUF_PRE_TOKENIZERS = {"qwen2": QWEN2_PATTERN}


def _gguf_value(metadata: dict, key: str, default: Any = ...) -> Any:
    """``metadata[key]``, or a ``ValueError`` naming the missing GGUF key."""
    if key in metadata:
        return metadata[key]
    if default is ...:
        raise ValueError(f"GGUF tokenizer metadata has no {key!r}")
    return default


def _gguf_merges(merges: list[str]) -> list[list[str]]:
    """GGUF merges ``"a b"`` -> tokenizer.json pairs ``["a", "b"]`` (byte-level tokens hold no spaces)."""
    pairs = []
    for rank, merge in enumerate(merges):
        pair = merge.split(" ")
        if len(pair) != 2 or not all(pair):
            raise ValueError(f"GGUF tokenizer.ggml.merges[{rank}] = {merge!r} is not two tokens separated by one space")
        pairs.append(pair)
    return pairs


def tokenizer_files_from_gguf(metadata: dict) -> dict[str, str]:
    """GGUF tokenizer metadata -> {"tokenizer.json": ..., "tokenizer_config.json": ...} (file name -> JSON text).

    ``metadata`` holds the GGUF ``tokenizer.*`` keys as plain Python values. Normal tokens form the
    BPE vocabulary; control tokens become special added tokens and user-defined tokens non-special
    added tokens (both matched before BPE, as HF does); unused padding rows are left out. For a
    ``qwen2`` pre-tokeniser the NFC normalizer of the official Qwen2/2.5 tokenizer.json is added.
    """
    model = _gguf_value(metadata, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model is {model!r}; only byte-level BPE ('gpt2') is supported")
    pre = _gguf_value(metadata, "tokenizer.ggml.pre")
    if pre not in GGUF_PRE_TOKENIZERS:
        raise ValueError(f"GGUF tokenizer.ggml.pre is {pre!r}; supported: {', '.join(GGUF_PRE_TOKENIZERS)}")
    tokens = list(_gguf_value(metadata, "tokenizer.ggml.tokens"))
    types = list(_gguf_value(metadata, "tokenizer.ggml.token_type", [1] * len(tokens)))
    if len(types) != len(tokens):
        raise ValueError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")

    vocab, added = {}, []
    for token_id, (token, kind) in enumerate(zip(tokens, types)):
        if kind in (GGUF_CONTROL, GGUF_USER_DEFINED):
            added.append((token_id, token, kind == GGUF_CONTROL))
        elif kind != GGUF_UNUSED:
            vocab[token] = token_id
    merges = _gguf_merges(_gguf_value(metadata, "tokenizer.ggml.merges"))
    tokenizer_json = byte_level_tokenizer_json(vocab, merges, added, pattern=GGUF_PRE_TOKENIZERS[pre], nfc=True)
    config = _tokenizer_config_from_gguf(metadata, tokens, tokenizer_json["added_tokens"])
    return {
        "tokenizer.json": json.dumps(tokenizer_json, ensure_ascii=False, indent=1) + "\n",
        "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2) + "\n",
    }


def _tokenizer_config_from_gguf(metadata: dict, tokens: list[str], added: list[dict[str, Any]]) -> dict[str, Any]:
    """The tokenizer_config.json transformers reads: special tokens by name, chat template."""

    def token_named_by(key: str) -> str | None:
        token_id = metadata.get(key)
        if token_id is None:
            return None
        if not 0 <= token_id < len(tokens):
            raise ValueError(f"GGUF {key} = {token_id} is outside the vocabulary of {len(tokens)} tokens")
        return tokens[token_id]

    config: dict[str, Any] = {
        "add_bos_token": bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        "add_prefix_space": False,
        "added_tokens_decoder": {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added},
        "bos_token": token_named_by("tokenizer.ggml.bos_token_id"),
        "clean_up_tokenization_spaces": False,
        "eos_token": token_named_by("tokenizer.ggml.eos_token_id"),
        "errors": "replace",
        "pad_token": token_named_by("tokenizer.ggml.padding_token_id"),
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if "tokenizer.chat_template" in metadata:
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return config
