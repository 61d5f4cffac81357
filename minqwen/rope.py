"""Rotary position embeddings (RoPE, Su et al. 2021 "RoFormer").

Each pair of channels of a query or key is rotated by an angle ``position * inv_freq[i]``.
A dot product of two rotated vectors then depends only on the *difference* of their positions,
so attention sees relative positions without any learned position table.

Qwen2 (like HF's Llama) uses the "split halves" layout: channel ``i`` is paired with channel
``i + head_dim / 2``, which is what :func:`rotate_half` implements.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .config import Qwen2Config

InvFreqFn = Callable[[Qwen2Config, dict[str, Any]], tuple[torch.Tensor, float]]


def default_inv_freq(config: Qwen2Config, scaling: dict[str, Any] | None = None) -> tuple[torch.Tensor, float]:
    """Plain RoPE: ``inv_freq[i] = theta ** (-2i / head_dim)``; attention factor 1."""
    dim = config.head_size
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # (head_dim/2,)
    return 1.0 / (config.rope_theta**exponents), 1.0


def linear_inv_freq(config: Qwen2Config, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """Position interpolation: every frequency is divided by ``factor`` (Chen et al. 2023)."""
    inv_freq, _ = default_inv_freq(config)
    return inv_freq / float(scaling["factor"]), 1.0


# rope_type -> function returning (inv_freq, attention_factor). Long-context types register here.
ROPE_INV_FREQ: dict[str, InvFreqFn] = {"default": default_inv_freq, "linear": linear_inv_freq}


def rope_type(config: Qwen2Config) -> str:
    """The RoPE variant named by ``rope_scaling`` (HF accepts both "rope_type" and "type")."""
    scaling = config.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def rope_inv_freq(config: Qwen2Config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the factor that multiplies cos and sin."""
    kind = rope_type(config)
    if kind not in ROPE_INV_FREQ:
        raise ValueError(
            f"rope_scaling type {kind!r} is not supported; known types: {sorted(ROPE_INV_FREQ)}"
        )
    return ROPE_INV_FREQ[kind](config, config.rope_scaling or {})


class RotaryEmbedding(nn.Module):
    """Turns position ids into the ``cos`` and ``sin`` tables that :func:`apply_rotary` uses."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        inv_freq, self.attention_factor = rope_inv_freq(config)
        # Not in the state dict (HF does the same): it is recomputed from the config.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (batch, seq) -> cos, sin each (batch, seq, head_dim), computed in fp32."""
        angles = position_ids[..., None].float() * self.inv_freq.float()  # (batch, seq, head_dim/2)
        angles = torch.cat((angles, angles), dim=-1)  # (batch, seq, head_dim): split-halves layout
        cos = angles.cos() * self.attention_factor
        sin = angles.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dim: a 90-degree turn of every pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (batch, heads, seq, head_dim) by the angles in cos/sin (batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (batch, 1, seq, head_dim): broadcast over heads
    return x * cos + rotate_half(x) * sin
