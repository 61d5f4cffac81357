"""Rotary position embeddings (RoPE, Su et al. 2021 "RoFormer").

Each pair of channels of a query or key is rotated by an angle ``position * inv_freq[i]``.
A dot product of two rotated vectors then depends only on the *difference* of their positions,
so attention sees relative positions without any learned position table.

Qwen2 (like HF's Llama) uses the "split halves" layout: channel ``i`` is paired with channel
``i + head_dim / 2``, which is what :func:`rotate_half` implements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .config import Qwen2Config

# (config, seq_len) -> (inv_freq (head_dim/2,), attention factor). ``seq_len`` is the length the
# tables must cover; only length-dependent types (dynamic NTK) read it.
InvFreqFn = Callable[[Qwen2Config, "int | None"], tuple[torch.Tensor, float]]


def base_inv_freq(dim: int, base: float) -> torch.Tensor:
    """Plain RoPE's inverse frequencies (dim/2,): pair ``i`` turns ``base ** (-2i / dim)`` radians per token."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim  # (dim/2,)
    return 1.0 / (base**exponents)


def default_inv_freq(config: Qwen2Config, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Plain RoPE with base ``rope_theta``; attention factor 1."""
    return base_inv_freq(config.head_dim, config.rope_theta), 1.0


def linear_inv_freq(config: Qwen2Config, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Position interpolation: every frequency is divided by ``factor`` (Chen et al. 2023)."""
    return base_inv_freq(config.head_dim, config.rope_theta) / float(config.rope_scaling["factor"]), 1.0


def dynamic_ntk_inv_freq(config: Qwen2Config, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Dynamic NTK scaling: past ``max_position_embeddings`` the base grows with the sequence length.

    ``base' = theta * (factor * L / L_max - (factor - 1)) ** (d / (d - 2))`` with
    ``L = max(seq_len, L_max)``, so sequences that fit keep the trained frequencies exactly.
    Unlike static scalings the frequencies depend on ``seq_len``: :class:`RotaryEmbedding`
    recomputes them on every call from the largest position it is given.
    """
    dim, trained = config.head_dim, config.max_position_embeddings
    length = max(seq_len or trained, trained)
    factor = float(config.rope_scaling["factor"])
    base = config.rope_theta * ((factor * length / trained) - (factor - 1)) ** (dim / (dim - 2))
    return base_inv_freq(dim, base), 1.0


# --------------------------------------------------------------------------- YaRN
def yarn_attention_factor(factor: float, scaling: dict[str, Any]) -> float:
    """YaRN's attention temperature, the number cos and sin are multiplied by.

    Softmax logits get ``attention_factor ** 2`` times larger, which sharpens attention that long
    contexts would otherwise blur. An explicit ``attention_factor`` wins; else
    ``0.1 * ln(factor) + 1`` (DeepSeek's ``mscale``/``mscale_all_dim`` variant when both are set).
    """
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])

    def mscale(scale: float, weight: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    if scaling.get("mscale") and scaling.get("mscale_all_dim"):
        return mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
    return mscale(factor)


def yarn_correction_range(
    dim: int, base: float, original_max: int, beta_fast: float, beta_slow: float, truncate: bool = True
) -> tuple[float, float]:
    """Frequency indices (of the ``dim/2`` pairs) where YaRN's ramp starts and ends.

    Pair ``i`` turns ``original_max / (2 pi theta^(2i/dim))`` times over the trained context.
    Pairs turning more than ``beta_fast`` times are left alone (they already saw every angle),
    pairs turning fewer than ``beta_slow`` times are interpolated; solving for ``i`` gives the range.
    """

    def index_for(num_rotations: float) -> float:
        return dim * math.log(original_max / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = index_for(beta_fast), index_for(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def linear_ramp(low: float, high: float, size: int) -> torch.Tensor:
    """(size,) values rising linearly from 0 at index ``low`` to 1 at index ``high``, clamped."""
    if low == high:
        high += 0.001  # avoid dividing by zero, as HF does
    return ((torch.arange(size, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)


def yarn_inv_freq(config: Qwen2Config, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): interpolate the slow frequencies only, and sharpen attention.

    Each frequency is a blend ``extrapolated * (1 - ramp) + interpolated * ramp`` where
    "extrapolated" is plain RoPE, "interpolated" is divided by ``factor`` and the ramp
    (:func:`linear_ramp` over :func:`yarn_correction_range`) is 0 for fast pairs and 1 for slow
    ones. Same semantics as transformers 5.23's ``_compute_yarn_parameters``: an explicit
    ``factor`` wins over ``max_position_embeddings / original_max_position_embeddings``.
    """
    dim, base, scaling = config.head_dim, config.rope_theta, config.rope_scaling
    original_max = scaling.get("original_max_position_embeddings") or config.max_position_embeddings
    factor = scaling.get("factor")
    factor = float(factor) if factor is not None else config.max_position_embeddings / original_max
    extrapolated = base_inv_freq(dim, base)
    low, high = yarn_correction_range(
        dim,
        base,
        original_max,
        scaling.get("beta_fast") or 32,
        scaling.get("beta_slow") or 1,
        scaling.get("truncate", True),
    )
    ramp = linear_ramp(low, high, dim // 2)  # 0: keep the frequency, 1: divide it by factor
    inv_freq = extrapolated * (1 - ramp) + extrapolated / factor * ramp
    return inv_freq, yarn_attention_factor(factor, scaling)


@dataclass(frozen=True)
class RopeType:
    """One RoPE variant: how to compute its frequencies and what ``rope_scaling`` must name."""

    inv_freq: InvFreqFn
    required_keys: tuple[str, ...] = ()  # checked before any maths, so the error names the key
    length_dependent: bool = False  # frequencies change with the sequence length (recomputed per call)


# rope_type -> its variant. Long-context types register here.
ROPE_TYPES: dict[str, RopeType] = {
    "default": RopeType(default_inv_freq),
    "linear": RopeType(linear_inv_freq, ("factor",)),
    "dynamic": RopeType(dynamic_ntk_inv_freq, ("factor",), length_dependent=True),
    "yarn": RopeType(yarn_inv_freq),
}


def rope_type(config: Qwen2Config) -> str:
    """The RoPE variant named by ``rope_scaling`` (HF accepts both "rope_type" and "type")."""
    scaling = config.rope_scaling or {}
    return scaling.get("rope_type", scaling.get("type", "default"))


def check_rope_scaling(config: Qwen2Config) -> RopeType:
    """The RoPE variant after checking ``rope_scaling`` names a known type with its required keys."""
    kind, scaling = rope_type(config), config.rope_scaling or {}
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported; known types: {sorted(ROPE_TYPES)}")
    missing = [key for key in ROPE_TYPES[kind].required_keys if scaling.get(key) is None]
    if missing:
        raise ValueError(f"rope_scaling of type {kind!r} needs {', '.join(missing)}; got {scaling}")
    return ROPE_TYPES[kind]


def rope_inv_freq(config: Qwen2Config, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the factor that multiplies cos and sin.

    ``seq_len`` matters only for length-dependent types (dynamic NTK).
    """
    return check_rope_scaling(config).inv_freq(config, seq_len)


class RotaryEmbedding(nn.Module):
    """Turns position ids into the ``cos`` and ``sin`` tables that :func:`apply_rotary` uses."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.config = config
        self.length_dependent = check_rope_scaling(config).length_dependent
        with torch.device("cpu"):  # computed for real even while a model is built on "meta" (loading)
            inv_freq, self.attention_factor = rope_inv_freq(config)
        # Not in the state dict (HF does the same): it is recomputed from the config.
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids (batch, seq) -> cos, sin each (batch, seq, head_dim), computed in fp32.

        Length-dependent scalings (dynamic NTK) use the frequencies for a sequence that ends at
        the largest position given; HF keeps the largest length seen so far instead, which is
        the same while positions only grow (prefill, then decode).
        """
        inv_freq = self.inv_freq
        if self.length_dependent and position_ids.numel():
            seq_len = int(position_ids.max()) + 1
            inv_freq = rope_inv_freq(self.config, seq_len)[0].to(inv_freq.device)
        angles = position_ids[..., None].float() * inv_freq.float()  # (batch, seq, head_dim/2)
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
