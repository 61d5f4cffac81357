"""Dual Chunk Attention (DCA): attending far beyond the trained length without training.

RoPE attention only ever saw relative distances up to the trained length. DCA (An et al. 2024,
"Training-Free Long-Context Scaling of Large Language Models", ChunkLlama; used by Qwen2.5-1M)
cuts the sequence into chunks of ``chunk_len = chunk_size - local_size`` tokens and re-labels
positions so that no query--key distance ever exceeds ``chunk_size``:

- every key sits at ``p mod chunk_len`` (its place inside its chunk);
- a query at ``p`` (in-chunk index ``r = p mod chunk_len``) plays three roles:

  ============  ======================================  ====================================
  part          keys                                    query position
  ============  ======================================  ====================================
  intra         its own chunk, causal                   ``r``
  successive    the previous chunk, all of it           ``min(r + chunk_len, chunk_size)``
  inter         every chunk before the previous one     ``min(2 chunk_len - 1, chunk_size)``
  ============  ======================================  ====================================

Intra-chunk distances are exact; neighbouring tokens across a chunk border stay close
(``r + chunk_len - j``); far chunks all look "about a chunk away". The three parts are one
softmax over all keys, so the output is a proper attention average.

Two implementations compute the same thing:

- :func:`reference_dca_attention` builds the (query position, key position) matrices for the
  whole sequence and does one masked softmax -- quadratic memory, the one to read;
- :func:`chunked_dca_attention` walks over blocks of queries and keys, never holding more than
  one block pair of scores, and merges the partial softmaxes exactly by log-sum-exp.

Optionally (Qwen2.5-1M's ``original_max_position_embeddings``) the logits of a query at
position ``p`` are multiplied by ``max(1, 0.1 ln((p + 1) / L0) + 1)`` -- vLLM's length scaling,
applied once. vLLM multiplies the keys as they enter its cache by the factor of the sequence
length at that moment; scaling each query's logits by the factor of its own length is the same
for the last prompt token and keeps prefill, chunked prefill and decoding exactly consistent.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .attention import Qwen2Attention
from .cache import KVCache
from .config import Qwen2Config
from .rope import RotaryEmbedding, apply_rotary

# The parts of a DCA score matrix, as stored in :func:`dca_position_matrices`'s ``part``.
INTRA, SUCCESSIVE, INTER = 0, 1, 2
# Side of the largest block of scores the chunked implementation holds per head: at most
# DEFAULT_BLOCK queries x DEFAULT_BLOCK keys, or (fewer queries) x proportionally more keys.
DEFAULT_BLOCK = 1024


@dataclass(frozen=True)
class DualChunkSettings:
    """``dual_chunk_attention_config`` as in Qwen2.5-1M's ``config.json`` (other keys are ignored)."""

    chunk_size: int  # C: the longest query-key distance DCA ever presents to RoPE
    local_size: int  # W: how far past its chunk the successive part may reach; chunks hold C - W
    original_max_position_embeddings: int = 0  # L0 of the length scaling; 0 switches it off

    def __post_init__(self) -> None:
        for name in ("chunk_size", "local_size", "original_max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"dual_chunk_attention_config.{name} must be a non-negative integer, got {value!r}")
        if self.chunk_len < 1:
            raise ValueError(
                f"dual_chunk_attention_config: local_size ({self.local_size}) must be smaller than "
                f"chunk_size ({self.chunk_size})"
            )

    @property
    def chunk_len(self) -> int:
        """Tokens per chunk: ``chunk_size - local_size``."""
        return self.chunk_size - self.local_size

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DualChunkSettings":
        """Read the config dict; ``chunk_size`` and ``local_size`` are required."""
        if not isinstance(d, dict):
            raise ValueError(f"dual_chunk_attention_config must be a dict, got {type(d).__name__}")
        missing = [key for key in ("chunk_size", "local_size") if key not in d]
        if missing:
            raise ValueError(f"dual_chunk_attention_config is missing {', '.join(missing)}; got {d}")
        return cls(d["chunk_size"], d["local_size"], d.get("original_max_position_embeddings") or 0)

    @classmethod
    def from_config(cls, config: Qwen2Config) -> "DualChunkSettings | None":
        """The settings of a model config, or None when DCA is off."""
        if config.dual_chunk_attention_config is None:
            return None
        if config.use_sliding_window:
            raise ValueError("dual_chunk_attention_config cannot be combined with use_sliding_window")
        return cls.from_dict(config.dual_chunk_attention_config)

    # ----------------------------------------------------------------- positions
    def key_positions(self, positions: torch.Tensor) -> torch.Tensor:
        """Where RoPE puts a key at absolute position ``p``: ``p mod chunk_len``."""
        return positions % self.chunk_len

    def query_positions(self, positions: torch.Tensor) -> dict[int, torch.Tensor]:
        """Where RoPE puts a query at ``p`` in each part: {INTRA, SUCCESSIVE, INTER} -> positions."""
        in_chunk = positions % self.chunk_len
        return {
            INTRA: in_chunk,
            SUCCESSIVE: (in_chunk + self.chunk_len).clamp(max=self.chunk_size),
            INTER: torch.full_like(positions, min(2 * self.chunk_len - 1, self.chunk_size)),
        }

    def length_scale(self, positions: torch.Tensor) -> torch.Tensor:
        """Logit multiplier of a query at ``p``: ``max(1, 0.1 ln((p+1) / L0) + 1)``, or 1 if L0 = 0."""
        if not self.original_max_position_embeddings:
            return torch.ones(positions.shape, dtype=torch.float32, device=positions.device)
        ratio = (positions + 1).float() / self.original_max_position_embeddings
        return (0.1 * ratio.log() + 1.0).clamp(min=1.0)


def dca_position_matrices(
    q_positions: torch.Tensor, k_positions: torch.Tensor, settings: DualChunkSettings
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The explicit DCA picture for queries (T,) and keys (S,) at absolute positions.

    Returns (query_pos, key_pos, part, visible), each (T, S): the positions RoPE uses for the
    pair, which part the pair belongs to (INTRA, SUCCESSIVE or INTER) and the causal mask.
    The attention score of a visible pair depends only on ``query_pos - key_pos``.
    """
    q_chunk = (q_positions // settings.chunk_len)[:, None]  # (T, 1)
    k_chunk = (k_positions // settings.chunk_len)[None, :]  # (1, S)
    part = torch.full((len(q_positions), len(k_positions)), INTER, dtype=torch.long, device=q_positions.device)
    part[(k_chunk == q_chunk - 1).expand_as(part)] = SUCCESSIVE
    part[(k_chunk == q_chunk).expand_as(part)] = INTRA
    roles = settings.query_positions(q_positions)
    query_pos = torch.stack([roles[INTRA], roles[SUCCESSIVE], roles[INTER]])[:, :, None]  # (3, T, 1)
    query_pos = query_pos.expand(3, -1, len(k_positions)).gather(0, part[None]).squeeze(0)  # (T, S)
    key_pos = settings.key_positions(k_positions)[None, :].expand_as(part)
    visible = k_positions[None, :] <= q_positions[:, None]
    return query_pos, key_pos, part, visible


def grouped_scores(q: torch.Tensor, k: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """fp32 scores of q (B, H, T, D) against k (B, KV, S, D), grouped: (B, KV, H/KV, T, S).

    The query heads sharing a key head are stacked along the rows, so it is one plain batched
    matmul per key head -- no broadcast copy of the keys.
    """
    batch, n_heads, q_len, head_dim = q.shape
    n_kv, k_len = k.shape[1], k.shape[2]
    rows = q.float().reshape(batch, n_kv, n_heads // n_kv * q_len, head_dim)  # (B, KV, G*T, D)
    scores = rows @ k.float().transpose(-1, -2)  # (B, KV, G*T, S)
    return scores.view(batch, n_kv, n_heads // n_kv, q_len, k_len) * scale


def grouped_weighted_sum(probs: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """probs (B, KV, G, T, S) times v (B, KV, S, D) -> (B, KV, G, T, D), in fp32."""
    batch, n_kv, group, q_len, k_len = probs.shape
    out = probs.reshape(batch, n_kv, group * q_len, k_len) @ v.float()  # (B, KV, G*T, D)
    return out.view(batch, n_kv, group, q_len, -1)


def reference_dca_attention(
    queries: dict[int, torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    q_positions: torch.Tensor,
    settings: DualChunkSettings,
    scale: float,
) -> torch.Tensor:
    """DCA written out with full (T, S) matrices: one masked softmax over all three parts.

    queries: {INTRA, SUCCESSIVE, INTER} -> (B, H, T, D), the queries rotated for each part;
    k, v (B, KV, S, D): keys rotated at ``key_positions``, for absolute positions 0..S-1;
    q_positions (T,): absolute positions of the queries. Returns (B, H, T, D) in q's dtype.
    """
    k_positions = torch.arange(k.shape[2], device=k.device)
    _, _, part, visible = dca_position_matrices(q_positions, k_positions, settings)
    query_scale = (scale * settings.length_scale(q_positions))[:, None]  # (T, 1)
    scores = torch.where(
        part == INTRA,
        grouped_scores(queries[INTRA], k, query_scale),
        torch.where(part == SUCCESSIVE, grouped_scores(queries[SUCCESSIVE], k, query_scale), grouped_scores(queries[INTER], k, query_scale)),
    )  # (B, KV, G, T, S)
    probs = scores.masked_fill(~visible, float("-inf")).softmax(dim=-1)
    out = grouped_weighted_sum(probs, v)  # (B, KV, G, T, D)
    batch, n_heads, q_len, head_dim = queries[INTRA].shape
    return out.view(batch, n_heads, q_len, head_dim).to(v.dtype)


# --------------------------------------------------------------------------- chunked implementation
@dataclass
class PartialSoftmax:
    """Attention over a subset of keys: output (B, KV, G, T, D) and its log-sum-exp (B, KV, G, T, 1)."""

    out: torch.Tensor
    lse: torch.Tensor

    def merge(self, other: "PartialSoftmax | None") -> "PartialSoftmax":
        """The attention over both key subsets: softmax over a union, from the two halves."""
        if other is None:
            return self
        lse = torch.logaddexp(self.lse, other.lse)
        return PartialSoftmax(self.out * (self.lse - lse).exp() + other.out * (other.lse - lse).exp(), lse)


def partial_softmax(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor, visible: torch.Tensor | None
) -> PartialSoftmax:
    """Softmax attention of q (B, H, T, D) over k, v (B, KV, S, D), remembering the log-sum-exp."""
    scores = grouped_scores(q, k, scale)  # (B, KV, G, T, S)
    if visible is not None:
        scores = scores.masked_fill(~visible, float("-inf"))
    lse = scores.logsumexp(dim=-1, keepdim=True)  # (B, KV, G, T, 1); -inf where a row sees no key
    shift = torch.where(lse.isfinite(), lse, 0.0)  # such a row gets weight 0 in the merge, not NaN
    return PartialSoftmax(grouped_weighted_sum((scores - shift).exp(), v), lse)


def dca_key_segments(q_start: int, q_end: int, settings: DualChunkSettings) -> list[tuple[int, int, int]]:
    """(part, key_start, key_end) for queries [q_start, q_end) that lie in one chunk."""
    chunk_start = q_start // settings.chunk_len * settings.chunk_len
    previous = max(chunk_start - settings.chunk_len, 0)
    segments = [(INTRA, chunk_start, q_end)]
    if chunk_start > 0:
        segments.append((SUCCESSIVE, previous, chunk_start))
    if previous > 0:
        segments.append((INTER, 0, previous))
    return segments


def query_blocks(start: int, end: int, settings: DualChunkSettings, block: int) -> list[tuple[int, int]]:
    """Split positions [start, end) into blocks of at most ``block`` that never cross a chunk border."""
    blocks = []
    while start < end:
        chunk_end = (start // settings.chunk_len + 1) * settings.chunk_len
        stop = min(end, chunk_end, start + block)
        blocks.append((start, stop))
        start = stop
    return blocks


def chunked_dca_attention(
    queries: dict[int, torch.Tensor],
    k: torch.Tensor,
    v: torch.Tensor,
    q_start: int,
    settings: DualChunkSettings,
    scale: float,
    block: int = DEFAULT_BLOCK,
) -> torch.Tensor:
    """The same as :func:`reference_dca_attention`, one (query block, key block) pair at a time.

    queries: {part: (B, H, T, D)} for the queries at positions ``q_start .. q_start + T - 1``;
    k, v (B, KV, q_start + T, D): every key so far (e.g. from the KV cache). Query blocks stay
    inside one chunk, so each block's keys split into at most three ranges (intra, successive,
    inter), each cut into pieces of ``block * block // queries`` keys: scores held at once are at
    most ``block x block`` per head, and decoding one token takes one piece per range.
    """
    batch, n_heads, q_len, head_dim = queries[INTRA].shape
    out = torch.empty(batch, k.shape[1], n_heads // k.shape[1], q_len, head_dim, dtype=torch.float32, device=k.device)
    for start, end in query_blocks(q_start, q_start + q_len, settings, block):
        rows = slice(start - q_start, end - q_start)
        positions = torch.arange(start, end, device=k.device)
        query_scale = (scale * settings.length_scale(positions))[:, None]  # (rows, 1)
        acc = None
        piece_len = block * block // (end - start)
        for part, key_start, key_end in dca_key_segments(start, end, settings):
            for piece in range(key_start, key_end, piece_len):
                piece_end = min(piece + piece_len, key_end)
                visible = None
                if part == INTRA:  # causal inside the own chunk
                    visible = torch.arange(piece, piece_end, device=k.device)[None, :] <= positions[:, None]
                partial = partial_softmax(
                    queries[part][:, :, rows], k[:, :, piece:piece_end], v[:, :, piece:piece_end], query_scale, visible
                )
                acc = partial.merge(acc)
        out[:, :, :, rows] = acc.out
    return out.view(batch, n_heads, q_len, head_dim).to(v.dtype)


# --------------------------------------------------------------------------- the swapped-in attention
DUAL_CHUNK_LAYER_TYPE = "dual_chunk_attention"  # a DCA layer's ``layer_type``: it needs no causal mask


@dataclass
class DualChunkRope:
    """Everything a DCA layer needs about positions: cos/sin tables of keys and of each query part."""

    settings: DualChunkSettings
    q_start: int  # absolute position of the first query (= tokens already cached)
    key: tuple[torch.Tensor, torch.Tensor]  # cos, sin (batch, seq, head_dim) at key positions
    queries: dict[int, tuple[torch.Tensor, torch.Tensor]]  # part -> cos, sin at that part's positions

    @classmethod
    def build(
        cls,
        rotary: RotaryEmbedding,
        settings: DualChunkSettings,
        batch: int,
        q_start: int,
        q_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> "DualChunkRope":
        """Tables for queries at ``q_start .. q_start + q_len - 1`` (identical for every row)."""
        positions = torch.arange(q_start, q_start + q_len, device=device)

        def table(relabelled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return rotary(relabelled.expand(batch, q_len), dtype)

        queries = {part: table(p) for part, p in settings.query_positions(positions).items()}
        return cls(settings, q_start, table(settings.key_positions(positions)), queries)


class DualChunkAttention(Qwen2Attention):
    """A :class:`Qwen2Attention` that attends by chunks: keys at their in-chunk position, queries
    rotated once per part (intra, successive, inter).

    :func:`use_dual_chunk_attention` makes one from a plain layer by changing its class and adding
    ``dual_chunk`` (the settings) and ``rotary_emb`` (the model's, shared): the q/k/v/o parameters
    and their state-dict names stay. Positions come from the cache (the queries sit at
    ``cache.length, cache.length + 1, ...``), so the cos, sin and mask passed in are not used.
    ``attn_implementation`` ``"eager"`` runs :func:`reference_dca_attention`, ``"sdpa"``
    :func:`chunked_dca_attention`.
    """

    dual_chunk: DualChunkSettings
    rotary_emb: RotaryEmbedding

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x (batch, seq, hidden) -> (batch, seq, hidden)."""
        batch, seq, _ = x.shape
        past = cache.length if cache is not None else 0
        q, k, v = self.project(x)  # (B, H, T, D), (B, KV, T, D) x 2
        rope = DualChunkRope.build(self.rotary_emb, self.dual_chunk, batch, past, seq, x.dtype, x.device)
        k = apply_rotary(k, *rope.key)
        queries = {part: apply_rotary(q, part_cos, part_sin) for part, (part_cos, part_sin) in rope.queries.items()}
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, KV, S, D): every key so far
        if self.attn_implementation == "eager":
            q_positions = torch.arange(past, past + seq, device=x.device)
            out = reference_dca_attention(queries, k, v, q_positions, self.dual_chunk, self.scale)
        else:
            out = chunked_dca_attention(queries, k, v, past, self.dual_chunk, self.scale)
        return self.merge_heads(out)  # out: (B, H, T, D)


def use_dual_chunk_attention(body: nn.Module, settings: DualChunkSettings | None) -> None:
    """Swap every attention of ``body`` (a :class:`~minqwen.model.Qwen2Model`) in place: to
    :class:`DualChunkAttention` with ``settings``, back to plain :class:`Qwen2Attention` with None.

    Only classes and a few attributes change (as :func:`minqwen.linear.use_cpu_linears` does), so
    parameters stay where they are. With DCA on, a forward pre-hook on ``body`` rejects the inputs
    DCA cannot honour (padding, positions other than the cache index): see :func:`check_dca_inputs`.
    """
    for layer in body.layers:
        attention = layer.self_attn
        if settings is not None:
            attention.__class__ = DualChunkAttention
            attention.dual_chunk, attention.rotary_emb = settings, body.rotary_emb
            attention.layer_type = DUAL_CHUNK_LAYER_TYPE
        elif isinstance(attention, DualChunkAttention):
            del attention.dual_chunk, attention.rotary_emb
            attention.__class__ = Qwen2Attention
            attention.layer_type = body.config.layer_type(attention.layer_idx)
    handle = body.__dict__.pop("dual_chunk_input_check", None)
    if handle is not None:
        handle.remove()
    if settings is not None:
        body.dual_chunk_input_check = body.register_forward_pre_hook(check_dca_call, with_kwargs=True)


def check_dca_call(body: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook: :func:`check_dca_inputs` on the arguments of ``Qwen2Model.forward``."""
    call = inspect.signature(body.forward).bind(*args, **kwargs).arguments
    cache = call.get("cache")
    past = cache.length if cache is not None else 0
    check_dca_inputs(call.get("position_ids"), call.get("attention_mask"), past, call["input_ids"].shape[1])


def check_dca_inputs(position_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, past: int, seq: int) -> None:
    """DCA reads chunks off the cache index: positions must be past, past+1, ... and unpadded."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("Dual Chunk Attention supports unpadded batches only (attention_mask has zeros)")
    if position_ids is not None:
        expected = torch.arange(past, past + seq, device=position_ids.device)
        if not bool((position_ids == expected).all()):
            raise ValueError(
                f"Dual Chunk Attention needs position_ids {past}..{past + seq - 1} (the cache index), "
                f"got {position_ids.tolist() if position_ids.numel() <= 16 else 'other positions'}"
            )


__all__ = [
    "DualChunkSettings",
    "DualChunkRope",
    "DualChunkAttention",
    "use_dual_chunk_attention",
    "INTRA",
    "SUCCESSIVE",
    "INTER",
    "dca_position_matrices",
    "reference_dca_attention",
    "chunked_dca_attention",
    "partial_softmax",
    "PartialSoftmax",
]
