"""Qwen2's tokenizer: where its files come from, and the ``Tokenizer`` that encodes and decodes.

A Qwen2 checkpoint ships its tokenizer either as HF files (``tokenizer.json``, or ``vocab.json`` +
``merges.txt``, plus ``tokenizer_config.json``) or inside a GGUF file as ``tokenizer.ggml.*``
metadata. :func:`tokenizer_files_from_gguf` turns the GGUF form into the HF form, so everything
downstream (minqwen, HF ``tokenizers``, ``transformers.AutoTokenizer``) reads one format.
"""

from __future__ import annotations

import json
from typing import Any

# Qwen2's pre-tokeniser: contractions, letter runs (with one leading non-letter), single digits,
# punctuation runs, newlines, and whitespace -- a space stays attached to the word after it.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# GGUF token types (llama.cpp's ``LLAMA_TOKEN_TYPE``): how each vocabulary entry is used.
GGUF_CONTROL = 3  # special token: <|im_start|>, <|endoftext|>, ...
GGUF_USER_DEFINED = 4  # added but not special: <tool_call>, ...
GGUF_UNUSED = 5  # padding rows of the embedding ([PAD151665] ...): no token at all

# The Qwen2 pre-tokeniser names GGUF uses, and whether the official tokenizer.json applies NFC.
# (GGUF does not record normalisation; Qwen2/2.5's official tokenizer.json has an NFC normalizer.)
GGUF_PRE_TOKENIZERS = {"qwen2": QWEN2_PATTERN}


def _byte_level() -> dict[str, Any]:
    """An HF ``ByteLevel`` component that only maps bytes (the regex split happens before it)."""
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def _added_token(token_id: int, content: str, special: bool) -> dict[str, Any]:
    """One entry of tokenizer.json's ``added_tokens`` list, as Qwen's official files write it."""
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


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
            added.append(_added_token(token_id, token, special=kind == GGUF_CONTROL))
        elif kind != GGUF_UNUSED:
            vocab[token] = token_id
    tokenizer_json = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": GGUF_PRE_TOKENIZERS[pre]}, "behavior": "Isolated", "invert": False},
                _byte_level(),
            ],
        },
        "post_processor": _byte_level(),
        "decoder": _byte_level(),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": _gguf_merges(_gguf_value(metadata, "tokenizer.ggml.merges")),
        },
    }
    config = _tokenizer_config_from_gguf(metadata, tokens, added)
    return {
        "tokenizer.json": json.dumps(tokenizer_json, ensure_ascii=False, indent=1) + "\n",
        "tokenizer_config.json": json.dumps(config, ensure_ascii=False, indent=2) + "\n",
    }


def _tokenizer_config_from_gguf(metadata: dict, tokens: list[str], added: list[dict]) -> dict[str, Any]:
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
