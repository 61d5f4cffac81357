"""Grouped-query self-attention with QKV bias, as in Qwen2 (Ainslie et al. 2023, "GQA").

``num_attention_heads`` query heads share ``num_key_value_heads`` key/value heads in groups of
``num_key_value_groups``. Groups are handled by reshaping the queries to
(batch, kv_heads, group, seq, head_dim) and broadcasting keys and values, so K/V are never
copied per query head.

Two interchangeable back-ends compute the same thing:
- ``"eager"``: written out step by step (scores, mask, softmax in fp32, weighted sum); it can
  also return the attention probabilities. This is the one the notebooks teach.
- ``"sdpa"``: PyTorch's fused ``scaled_dot_product_attention`` -- the fast default. For one
  new token (decoding) it goes through :func:`decode_attention`, which folds each group's query
  heads into rows of one KV head: the same kernel and result, several times faster.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache
from .config import Qwen2Config
from .rope import apply_rotary

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


def causal_mask(
    q_len: int,
    kv_len: int,
    attention_mask: torch.Tensor | None = None,
    sliding_window: int | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor | None:
    """Which keys each query may see: (B|1, 1, q_len, kv_len) bool, True = visible.

    The queries are the last ``q_len`` of ``kv_len`` positions (the rest come from the cache), so
    query i sits at position ``kv_len - q_len + i`` and sees keys at positions <= its own
    (``tril(ones(q_len, kv_len), kv_len - q_len)``). A ``sliding_window`` keeps only the last
    ``sliding_window`` keys, the query's own included. ``attention_mask`` (batch, >= kv_len),
    1 = real token and 0 = padding, hides padding keys; a padding query still sees itself so no
    softmax row is empty. Returns None when every key is visible (one new token, no padding).
    """
    if q_len == 1 and attention_mask is None and (sliding_window is None or sliding_window >= kv_len):
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]  # (q_len, 1)
    k_pos = torch.arange(kv_len, device=device)[None, :]  # (1, kv_len)
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    mask = mask[None, None]  # (1, 1, q_len, kv_len)
    if attention_mask is not None:
        real_keys = attention_mask[:, None, None, :kv_len].to(device=mask.device, dtype=torch.bool)
        mask = (mask & real_keys) | (k_pos == q_pos)  # (B, 1, q_len, kv_len)
    return mask


def eager_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention written out. q (B, H, T, D); k, v (B, KV, S, D); mask (B|1, 1, T, S) bool, True = see.

    Returns the output (B, H, T, D) and the probabilities (B, H, T, S).
    """
    batch, n_heads, q_len, head_dim = q.shape
    n_kv = k.shape[1]
    q = q.view(batch, n_kv, n_heads // n_kv, q_len, head_dim)  # (B, KV, G, T, D)
    scores = q @ k.unsqueeze(2).transpose(-1, -2) * scale  # (B, KV, G, T, S)
    if mask is not None:
        scores = scores.masked_fill(~mask.unsqueeze(2), float("-inf"))
    probs = scores.softmax(dim=-1, dtype=torch.float32).to(q.dtype)  # softmax in fp32, as HF
    out = probs @ v.unsqueeze(2)  # (B, KV, G, T, D)
    return out.view(batch, n_heads, q_len, head_dim), probs.view(batch, n_heads, q_len, -1)


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """The same as :func:`eager_attention` through PyTorch's fused kernel (GQA without K/V copies)."""
    if q.shape[2] == 1:
        return decode_attention(q, k, v, mask, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """:func:`sdpa_attention` for one new token: q (B, H, 1, D); k, v (B, KV, S, D); mask (B|1, 1, 1, S).

    With a single query position the G = H / KV query heads that share a KV head need no
    causal order among them, so they can stand in for G query *rows* of that one head:
    q (B, KV, G, D) against k, v (B, KV, S, D), a plain (non-GQA) attention whose mask
    broadcasts over the rows. The result is the same up to summation order (bit for bit up to a
    few hundred keys here, 1e-7 apart in fp32 at thousands), and PyTorch's CPU kernel runs it
    about 3x (40 keys) to 8x (255 keys) faster than with ``enable_gqa`` on Qwen2-0.5B's shapes,
    and the gap grows with the context.
    """
    batch, n_heads, _, head_dim = q.shape
    n_kv = k.shape[1]
    rows = q.view(batch, n_kv, n_heads // n_kv, head_dim)  # (B, KV, G, D)
    out = F.scaled_dot_product_attention(rows, k, v, attn_mask=mask, scale=scale)  # (B, KV, G, D)
    return out.view(batch, n_heads, 1, head_dim)


class Qwen2Attention(nn.Module):
    """Self-attention of one decoder layer: q/k/v projections with bias, RoPE, GQA, o_proj."""

    def __init__(self, config: Qwen2Config, layer_idx: int, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {attn_implementation!r}")
        self.layer_idx = layer_idx
        self.layer_type = config.layer_type(layer_idx)  # "full_attention" / "sliding_attention": picks the mask
        self.attn_implementation = attn_implementation
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.attention_probs = nn.Identity()  # a hook point: forward hooks here see the eager path's probabilities

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x (batch, seq, hidden) -> (batch, seq, hidden). ``mask``: see :func:`eager_attention`."""
        q, k, v = self.project(x)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, KV, S, D) with S = cached + T
        if self.attn_implementation == "eager":
            out, probs = eager_attention(q, k, v, mask, self.scale)
            self.attention_probs(probs)  # (B, H, T, S); identity, there for minqwen.inspection's hooks
        else:
            out = sdpa_attention(q, k, v, mask, self.scale)
        return self.merge_heads(out)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, T, hidden) -> q (B, H, T, D), k and v (B, KV, T, D), before RoPE."""
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v

    def merge_heads(self, out: torch.Tensor) -> torch.Tensor:
        """The heads' outputs (B, H, T, D) -> o_proj of their concatenation (B, T, hidden)."""
        batch, _, seq, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))
