"""The Qwen2 decoder: embeddings, a stack of pre-norm blocks, a final norm and the LM head.

Module and parameter names are Hugging Face's, so ``state_dict()`` keys are exactly those of
``transformers.Qwen2ForCausalLM`` (``model.layers.0.self_attn.q_proj.weight`` ...) and weights
move between the two without renaming.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import Qwen2Attention, causal_mask
from .cache import KVCache
from .config import Qwen2Config
from .dca import DualChunkSettings, use_dual_chunk_attention
from .mlp import Qwen2MLP
from .norm import RMSNorm
from .rope import RotaryEmbedding


def is_skeleton(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` lives on the ``meta`` device: a model built there for loading has shapes only.

    Random initialisation (and quantisation) is skipped on such a skeleton: its values come from
    the checkpoint, and ``normal_`` on meta would import torch._dynamo, seconds for nothing.
    """
    return tensor.is_meta


def check_token_ids(
    ids: torch.Tensor, vocab_size: int, name: str = "input_ids", ignore_index: int | None = None
) -> None:
    """Raise ``ValueError`` unless ``ids`` is an integer (batch, seq) tensor of ids in [0, vocab_size)
    (or equal to ``ignore_index``, where labels allow one).

    The range check is one fused comparison and one host sync (``bool``); min and max are computed
    only to word the error. On a CPU the sync is free; on a GPU it is worth its cost, since an
    id out of range there is a device-side assert that poisons the whole CUDA context instead of
    an error. Decoding loops pay nothing: :mod:`minqwen.generate` checks its prompts once and
    runs the model body, whose input after the prompt is sampled ids, in range by construction.
    """
    if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{name} must be an integer tensor of shape (batch, seq), got {ids.dtype} {tuple(ids.shape)}")
    valid = (ids >= 0) & (ids < vocab_size)
    if ignore_index is not None:
        valid |= ids == ignore_index
    if not bool(valid.all()):
        bad = ids[~valid]
        allowed = "" if ignore_index is None else f" or {ignore_index} (ignored)"
        raise ValueError(
            f"{name} must be token ids in [0, vocab_size={vocab_size}){allowed}, got values in "
            f"[{int(bad.min())}, {int(bad.max())}] outside it"
        )


class Qwen2DecoderLayer(nn.Module):
    """One block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` (pre-norm residual stream)."""

    def __init__(self, config: Qwen2Config, layer_idx: int, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Qwen2Attention(config, layer_idx, attn_implementation)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Qwen2MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """x (batch, seq, hidden) -> (batch, seq, hidden)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """Token ids -> final hidden states (batch, seq, hidden): the body without the LM head."""

    def __init__(self, config: Qwen2Config, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        if not is_skeleton(self.embed_tokens.weight):
            self.embed_tokens.reset_parameters()
        self.layers = nn.ModuleList(
            Qwen2DecoderLayer(config, i, attn_implementation) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False  # training: recompute each layer in backward, keep only its input
        # Long context: Dual Chunk Attention, when configured, replaces the attention modules.
        use_dual_chunk_attention(self, DualChunkSettings.from_config(config))

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """See :meth:`Qwen2ForCausalLM.forward`; returns hidden states (batch, seq, hidden)."""
        batch, seq = input_ids.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + seq, device=input_ids.device).expand(batch, seq)
        x = self.embed_tokens(input_ids)  # (batch, seq, hidden)
        cos, sin = self.rotary_emb(position_ids, x.dtype)  # (batch, seq, head_dim) each
        masks = self.causal_masks(seq, past + seq, attention_mask, x.device)
        for layer in self.layers:
            mask = masks.get(layer.self_attn.layer_type)
            if self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled():
                x = checkpoint(layer, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        if cache is not None:
            cache.advance(seq)
        return self.norm(x)

    def causal_masks(
        self, q_len: int, kv_len: int, attention_mask: torch.Tensor | None, device: torch.device
    ) -> dict[str, torch.Tensor | None]:
        """The attention mask of each layer type in use, keyed like HF's (see :func:`causal_mask`).

        ``"full_attention"`` layers see every earlier position, ``"sliding_attention"`` layers the
        last ``sliding_window``. A layer type not named here (an attention swapped in that masks
        by itself) is given None, and no (q_len, kv_len) mask is built for it.
        """
        windows = {"full_attention": None, "sliding_attention": self.config.sliding_window}
        in_use = {layer.self_attn.layer_type for layer in self.layers} & windows.keys()
        return {kind: causal_mask(q_len, kv_len, attention_mask, windows[kind], device) for kind in in_use}


class Qwen2ForCausalLM(nn.Module):
    """Qwen2 with its language-model head: token ids (batch, seq) -> logits (batch, seq, vocab)."""

    def __init__(self, config: Qwen2Config, attn_implementation: str = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.model = Qwen2Model(config, attn_implementation)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        if not is_skeleton(self.lm_head.weight):
            self.apply(self._init_weights)

    def tie_weights(self) -> None:
        """With ``tie_word_embeddings`` the head and the embedding are one tensor."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def _init_weights(self, module: nn.Module) -> None:
        """HF's initialisation: normal(0, initializer_range) weights, zero biases, unit norms."""
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Next-token logits for every position.

        input_ids (batch, seq) LongTensor; position_ids (batch, seq), default: the positions after
        what ``cache`` holds; attention_mask (batch, cached + seq) with 1 for real tokens and 0 for
        padding; cache: a :class:`KVCache` that this call reads and extends.
        Returns logits (batch, seq, vocab_size).
        """
        check_token_ids(input_ids, self.config.vocab_size)
        return self.lm_head(self.model(input_ids, position_ids, attention_mask, cache))

    def extend_context(
        self,
        max_position_embeddings: int,
        rope_scaling: dict[str, Any] | None = None,
        dual_chunk_attention_config: dict[str, Any] | None = None,
    ) -> "Qwen2ForCausalLM":
        """Switch to a long-context position scheme in place; the weights stay as they are.

        ``rope_scaling`` (e.g. ``{"type": "yarn", "factor": 4.0, "original_max_position_embeddings":
        32768}``) and ``dual_chunk_attention_config`` take the ``config.json`` forms; None for both
        restores plain RoPE. ``max_position_embeddings`` is the new context limit. Returns self.
        """
        config = dataclasses.replace(
            self.config,
            max_position_embeddings=max_position_embeddings,
            rope_scaling=rope_scaling,
            dual_chunk_attention_config=dual_chunk_attention_config,
        )
        rotary = RotaryEmbedding(config).to(self.lm_head.weight.device)  # checks rope_scaling
        dual_chunk = DualChunkSettings.from_config(config)  # checks the DCA settings: nothing changed yet
        self.config = self.model.config = config
        self.model.rotary_emb = rotary
        use_dual_chunk_attention(self.model, dual_chunk)  # installs or removes DualChunkAttention
        return self

    def make_cache(self, batch_size: int, max_seq_len: int) -> KVCache:
        """A KV cache sized for ``max_seq_len`` tokens, in this model's dtype and device.

        The dtype is the embedding table's: the head may hold int8 weights (:mod:`minqwen.quant`).
        """
        weight = self.model.embed_tokens.weight
        return KVCache(self.config, batch_size, max_seq_len, weight.dtype, weight.device)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Distinct parameters (a tied head counts once); optionally without the embedding table."""
        total = sum(p.numel() for p in self.parameters())  # parameters() yields shared ones once
        if exclude_embeddings:
            total -= self.model.embed_tokens.weight.numel()
        return total
