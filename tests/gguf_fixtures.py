"""Write small GGUF files from minqwen models, so GGUF loading is tested without the real 491 MB file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter
from gguf.quants import quantize

from minqwen import Qwen2ForCausalLM
from minqwen.loading.gguf import BLOCK_NAMES, TOP_LEVEL_NAMES

HF_TO_GGUF = {hf: gguf for gguf, hf in {**TOP_LEVEL_NAMES, **BLOCK_NAMES}.items()}


def gguf_name(hf_name: str) -> str:
    """``model.layers.3.self_attn.q_proj.bias`` -> ``blk.3.attn_q.bias`` (the inverse mapping)."""
    stem, kind = hf_name.rsplit(".", 1)
    if stem.startswith("model.layers."):
        _, _, layer, part = stem.split(".", 3)
        return f"blk.{layer}.{HF_TO_GGUF[part]}.{kind}"
    return f"{HF_TO_GGUF[stem]}.{kind}"


MERGES = ["Ġ t", "h e"]  # the tiny tokenizer's merges, when the vocabulary has room for their results
MERGED = [merge.replace(" ", "") for merge in MERGES]


def byte_level_vocab(size: int) -> tuple[list[str], list[int]]:
    """The 256 GPT-2 byte symbols, ``<|endoftext|>``, the :data:`MERGED` tokens and filler tokens up to ``size``."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    tokens = [chr(c) for c in codes] + ["<|endoftext|>"]
    tokens += (MERGED + [f"tok{i}" for i in range(size)])[: size - len(tokens)]
    types = [1] * 256 + [3] + [1] * (size - 257)
    return tokens, types


def write_tiny_gguf(model: Qwen2ForCausalLM, path: Path, arch: str = "qwen2", quantize_q8: bool = True) -> None:
    """Save a (randomised) tiny model as GGUF: 2-D weights Q8_0 when their width allows, rest F32."""
    config = model.config
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    tokens, types = byte_level_vocab(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([merge for merge in MERGES if merge.replace(" ", "") in tokens])
    writer.add_eos_token_id(256)
    writer.add_bos_token_id(256)
    state_dict = model.state_dict()
    if config.tie_word_embeddings:
        state_dict.pop("lm_head.weight")
    for name, tensor in state_dict.items():
        data = tensor.detach().float().numpy()
        if quantize_q8 and data.ndim == 2 and data.shape[1] % 32 == 0:
            writer.add_tensor(gguf_name(name), quantize(data, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(gguf_name(name), np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def q8_roundtrip(model: Qwen2ForCausalLM) -> dict[str, torch.Tensor]:
    """The state dict the tiny GGUF will hold after Q8_0 quantisation and dequantisation."""
    from gguf.quants import dequantize

    out = {}
    for name, tensor in model.state_dict().items():
        data = tensor.detach().float().numpy()
        if data.ndim == 2 and data.shape[1] % 32 == 0:
            data = dequantize(quantize(data, GGMLQuantizationType.Q8_0), GGMLQuantizationType.Q8_0).reshape(data.shape)
        out[name] = torch.from_numpy(np.array(data, dtype=np.float32))
    return out
