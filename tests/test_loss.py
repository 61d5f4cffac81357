"""Loss and gradients equal HF transformers' on tiny random configs (fp32)."""

from __future__ import annotations

import pytest
import torch
from helpers import hf_twin, random_model, tiny_config

from minqwen.loss import IGNORE_INDEX, labels_from_mask, lm_loss, next_token_loss, shift_labels

REL_TOL = 1e-5


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """max |actual - expected| <= REL_TOL * max |expected| (relative to the tensor's scale)."""
    diff = (actual - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert diff <= REL_TOL * max(scale, 1e-12), f"{what}: max abs diff {diff:.3e}, scale {scale:.3e}"


def batch(config, seed: int = 1, shape=(3, 11)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids and labels = ids with a few positions ignored (a prompt and one scattered hole)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, shape, generator=generator)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX  # a "prompt" we only condition on
    labels[1, 7] = IGNORE_INDEX
    return ids, labels


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("tied", [False, True])
def test_loss_and_gradients_equal_hf(tied: bool) -> None:
    config = tiny_config(tied=tied)
    model = random_model(config)
    hf = hf_twin(model)
    ids, labels = batch(config)

    loss = lm_loss(model, ids, labels)
    loss.backward()
    hf_loss = hf(input_ids=ids, labels=labels).loss
    hf_loss.backward()

    assert_rel_close(loss.detach(), hf_loss.detach(), "loss")
    ours, theirs = grads(model), grads(hf)
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert_rel_close(ours[name], theirs[name], f"grad of {name}")


def test_loss_with_padding_equals_hf() -> None:
    """Left padding: labels default to the ids with padding ignored, as a user would pass to HF."""
    config = tiny_config()
    model = random_model(config)
    hf = hf_twin(model)
    ids, _ = batch(config)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :2] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[0, 4] = labels[2, 2] = IGNORE_INDEX  # nothing real precedes the first real token
    assert torch.equal(labels_from_mask(ids, mask), labels)

    ours = lm_loss(model, ids, attention_mask=mask)
    theirs = hf(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert_rel_close(ours.detach(), theirs.detach(), "padded loss")


def test_next_token_loss_equals_hf_loss_function() -> None:
    from transformers.loss.loss_utils import ForCausalLMLoss

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 50, generator=generator)
    labels = torch.randint(0, 50, (2, 9), generator=generator)
    labels[0, 4] = IGNORE_INDEX
    expected = ForCausalLMLoss(logits, labels, vocab_size=50)
    assert_rel_close(next_token_loss(logits, labels), expected, "next_token_loss")


def test_lm_loss_equals_loss_of_full_logits() -> None:
    """Applying the head only where a label is gives the loss of the full logits."""
    config = tiny_config()
    model = random_model(config)
    ids, labels = batch(config)
    with torch.no_grad():
        assert_rel_close(lm_loss(model, ids, labels), next_token_loss(model(ids), labels), "lm_loss vs full logits")


def test_shift_labels() -> None:
    labels = torch.tensor([[5, 6, 7]])
    assert shift_labels(labels).tolist() == [[6, 7, IGNORE_INDEX]]


def test_gradient_checkpointing_gives_same_loss_and_gradients() -> None:
    config = tiny_config()
    ids, labels = batch(config)
    results = []
    for checkpointing in (False, True):
        model = random_model(config).train()
        model.model.gradient_checkpointing = checkpointing
        loss = lm_loss(model, ids, labels)
        loss.backward()
        results.append((loss.detach(), grads(model)))
    (loss_plain, grads_plain), (loss_ckpt, grads_ckpt) = results
    assert_rel_close(loss_ckpt, loss_plain, "loss")
    for name in grads_plain:
        assert_rel_close(grads_ckpt[name], grads_plain[name], f"grad of {name}")


@pytest.mark.parametrize(
    "labels, message",
    [
        (torch.zeros(3, 10, dtype=torch.long), "labels must have the shape of input_ids"),
        (torch.zeros(3, 11), "labels must be an integer tensor"),
        (torch.full((3, 11), 300), r"labels must be token ids in \[0, vocab_size=257\)"),
        (torch.full((3, 11), IGNORE_INDEX), "labels leave nothing to predict"),
    ],
)
def test_bad_labels_are_clear_errors(labels: torch.Tensor, message: str) -> None:
    config = tiny_config()
    model = random_model(config)
    ids, _ = batch(config)
    with pytest.raises(ValueError, match=message):
        lm_loss(model, ids, labels)


def test_bad_input_ids_are_clear_errors() -> None:
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match=r"input_ids must be token ids in \[0, vocab_size=257\)"):
        lm_loss(model, torch.tensor([[1, 2, 999]]))
    with pytest.raises(ValueError, match=r"logits must be \(batch, seq, vocab\)"):
        next_token_loss(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))
