"""The language-model loss: mean next-token cross-entropy, computed exactly as HF computes it.

A causal LM is trained to predict token ``t + 1`` from tokens ``0..t``. So the logits at position
``t`` are scored against the label at ``t + 1`` (the *shift*), the last position has nothing to
predict, and any label equal to :data:`IGNORE_INDEX` (-100: padding, or a prompt we only condition
on) is left out of the mean. ``labels`` therefore has the shape of ``input_ids`` and is usually
``input_ids`` itself, with -100 where no loss is wanted.

:func:`lm_loss` runs the model body once and applies the LM head only at the positions that have
a label: with a 151,936-token vocabulary the head is a large share of the compute, and in
instruction tuning most positions are prompt.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .model import Qwen2ForCausalLM, check_token_ids

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """labels (batch, seq) -> the target of each position (batch, seq): labels[:, t + 1], last = ignore."""
    return F.pad(labels, (0, 1), value=ignore_index)[:, 1:]


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy of logits (batch, seq, vocab) against the shifted labels (batch, seq).

    Computed in fp32 whatever the logits' dtype, as HF does, so bf16 training gets a precise loss.
    """
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be (batch, seq, vocab) and labels (batch, seq) with the same batch and seq, got "
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    check_labels(labels, logits.shape[-1], ignore_index)
    targets = shift_labels(labels, ignore_index)  # (batch, seq)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=ignore_index)


def check_labels(labels: torch.Tensor, vocab_size: int, ignore_index: int = IGNORE_INDEX) -> None:
    """Raise ``ValueError`` unless labels are token ids or ``ignore_index``, with at least one
    position left to predict (a mean over nothing is NaN)."""
    check_token_ids(labels, vocab_size, "labels", ignore_index)
    if not (shift_labels(labels, ignore_index) != ignore_index).any():
        raise ValueError(
            f"labels leave nothing to predict: every label after the first position is {ignore_index} "
            "(the first label is never a target, since no token precedes it)"
        )


def labels_from_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Labels for a padded batch: each token is a target only if it and the token before it are real.

    A token right after padding has no real context (like the first token of any sequence), so
    predicting it from a padding position would only add noise to the loss.
    """
    real = attention_mask.to(torch.bool)  # (batch, seq)
    previous_real = F.pad(real, (1, 0), value=True)[:, :-1]  # (batch, seq); position 0 is never a target anyway
    return input_ids.masked_fill(~(real & previous_real), IGNORE_INDEX)


def lm_loss(
    model: Qwen2ForCausalLM,
    input_ids: torch.Tensor,
    labels: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-token cross-entropy of ``model`` on a batch; equal to HF's ``model(..., labels=...).loss``.

    input_ids (batch, seq); labels (batch, seq), default ``input_ids`` (with padding ignored, see
    :func:`labels_from_mask`); attention_mask (batch, seq) with 1 = real token.
    Returns a scalar fp32 tensor that ``backward()`` differentiates. Set
    ``model.model.gradient_checkpointing = True`` (and ``model.train()``) to trade compute for
    activation memory.
    """
    if labels is None:
        labels = input_ids if attention_mask is None else labels_from_mask(input_ids, attention_mask)
    check_token_ids(input_ids, model.config.vocab_size)
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    check_labels(labels, model.config.vocab_size)
    targets = shift_labels(labels)  # (batch, seq)
    scored = targets != IGNORE_INDEX  # (batch, seq) positions whose prediction counts
    hidden = model.model(input_ids, position_ids, attention_mask)  # (batch, seq, hidden)
    logits = model.lm_head(hidden[scored])  # (n_scored, vocab): the head only where it is needed
    return F.cross_entropy(logits.float(), targets[scored])
