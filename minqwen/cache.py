"""A preallocated key/value cache for incremental decoding.

While generating, every new token needs the keys and values of all earlier tokens. Recomputing
them costs a full forward per token; keeping them costs memory:
``2 * layers * kv_heads * head_dim * bytes`` per token -- which is why Qwen2 uses few KV heads
(GQA). The buffers are allocated once for the longest sequence the caller asks for and written
in place, so decoding never re-copies the cache.
"""

from __future__ import annotations

import copy

import torch

from .config import Qwen2Config


class KVCache:
    """Keys and values of every layer, shape (layers, batch, kv_heads, max_seq_len, head_dim)."""

    def __init__(
        self,
        config: Qwen2Config,
        batch_size: int,
        max_seq_len: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        if batch_size < 1 or max_seq_len < 1:
            raise ValueError(f"KVCache needs batch_size >= 1 and max_seq_len >= 1, got {batch_size}, {max_seq_len}")
        shape = (config.num_hidden_layers, batch_size, config.num_key_value_heads, max_seq_len, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0  # tokens already stored (the same for every layer between forwards)

    @property
    def max_seq_len(self) -> int:
        """How many tokens fit."""
        return self.keys.shape[3]

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (batch, kv_heads, new, head_dim) after the cached ones; return all so far."""
        end = self.length + k.shape[2]
        if end > self.max_seq_len:
            raise ValueError(f"KVCache is full: {end} tokens do not fit in max_seq_len={self.max_seq_len}")
        self.keys[layer_idx, :, :, self.length : end] = k
        self.values[layer_idx, :, :, self.length : end] = v
        return self.keys[layer_idx, :, :, :end], self.values[layer_idx, :, :, :end]

    def advance(self, num_tokens: int) -> None:
        """Called by the model once every layer has stored ``num_tokens`` new positions."""
        self.length += num_tokens

    def reset(self) -> None:
        """Forget everything (the buffers are reused)."""
        self.length = 0

    def truncate(self, length: int) -> None:
        """Keep only the first ``length`` tokens (a prefix shared with the next prompt, say).

        The buffers stay; the positions after ``length`` are overwritten by the next forward.
        """
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache holding {self.length} tokens to {length}")
        self.length = length

    def resized(self, max_seq_len: int) -> KVCache:
        """A new cache with room for ``max_seq_len`` tokens, holding a copy of this one's tokens."""
        if max_seq_len < self.length:
            raise ValueError(f"a cache for {max_seq_len} tokens cannot hold the {self.length} this one holds")
        resized = copy.copy(self)
        shape = (*self.keys.shape[:3], max_seq_len, self.keys.shape[4])
        resized.keys, resized.values = self.keys.new_zeros(shape), self.values.new_zeros(shape)
        resized.keys[..., : self.length, :] = self.keys[..., : self.length, :]
        resized.values[..., : self.length, :] = self.values[..., : self.length, :]
        return resized

    def nbytes(self) -> int:
        """Memory held by the buffers."""
        return self.keys.nbytes + self.values.nbytes
