"""Hidden states, attention probabilities and patching: equal to HF, and patches do what they predict."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, assert_exercise_check, hf_twin, random_model, tiny_config

from minqwen.exercises import check_exercise_previous_token_score
from minqwen.inspection import at_positions, logit_lens, patching, previous_token_score, recording, trace


def sample_ids(config, shape=(2, 9), seed: int = 3) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_hidden_states_and_attentions_equal_hf(attn_implementation: str) -> None:
    config = tiny_config(num_hidden_layers=3)
    model = random_model(config, attn_implementation=attn_implementation)
    hf = hf_twin(model)
    ids = sample_ids(config)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding

    ours = trace(model, ids, attentions=True, attention_mask=mask)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)

    assert len(ours.hidden_states) == len(theirs.hidden_states) == config.num_hidden_layers + 1
    for ours_h, theirs_h in zip(ours.hidden_states[:-1], theirs.hidden_states[:-1]):
        assert_close(ours_h[mask.bool()], theirs_h[mask.bool()])
    with torch.no_grad():  # HF applies the final norm to its last hidden state; we keep the raw stream
        assert_close(model.model.norm(ours.hidden_states[-1])[mask.bool()], theirs.hidden_states[-1][mask.bool()])
    assert len(ours.attentions) == len(theirs.attentions) == config.num_hidden_layers
    for ours_a, theirs_a in zip(ours.attentions, theirs.attentions):
        assert ours_a.shape == (2, config.num_attention_heads, 9, 9)
        assert_close(ours_a[mask.bool()[:, None, :].expand(-1, 4, -1)], theirs_a[mask.bool()[:, None, :].expand(-1, 4, -1)])
    assert_close(ours.logits[mask.bool()], theirs.logits[mask.bool()])


def test_trace_leaves_the_model_as_it_was() -> None:
    model = random_model(tiny_config())
    trace(model, sample_ids(model.config), attentions=True, capture=["model.layers.0.mlp"], patches={"model.norm": lambda h: h})
    for name, module in model.named_modules():
        assert not module._forward_hooks, f"hook left on {name}"
    assert all(layer.self_attn.attn_implementation == "sdpa" for layer in model.model.layers)


def test_attention_probabilities_are_causal_distributions() -> None:
    model = random_model(tiny_config())
    probs = trace(model, sample_ids(model.config), attentions=True).attentions[0]  # (batch, heads, seq, seq)
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:-1]))
    assert (probs.triu(diagonal=1) == 0).all()


def test_patching_a_point_with_its_own_activation_is_a_no_op() -> None:
    model = random_model(tiny_config())
    ids = sample_ids(model.config)
    points = ["model.embed_tokens", "model.layers.0", "model.layers.1.self_attn", "model.layers.0.mlp", "model.norm"]
    clean = trace(model, ids, capture=points)
    for point in points:
        patched = trace(model, ids, patches={point: clean.activations[point]})
        assert torch.equal(patched.logits, clean.logits), point


def test_patching_the_whole_residual_stream_restores_the_clean_run() -> None:
    """Everything after block k reads only block k's output: patch it from the clean run, get the clean logits."""
    model = random_model(tiny_config(num_hidden_layers=3))
    clean_ids = sample_ids(model.config, seed=1)
    corrupt_ids = clean_ids.clone()
    corrupt_ids[:, 2] = (corrupt_ids[:, 2] + 1) % model.config.vocab_size
    clean = trace(model, clean_ids)
    corrupt = trace(model, corrupt_ids)
    assert not torch.allclose(clean.logits, corrupt.logits)
    for k in range(3):
        patched = trace(model, corrupt_ids, patches={f"model.layers.{k}": clean.hidden_states[k + 1]})
        assert torch.equal(patched.logits, clean.logits), f"layer {k}"


def test_patching_one_position_changes_only_that_position_and_later_ones() -> None:
    model = random_model(tiny_config())
    ids = sample_ids(model.config)
    base = trace(model, ids)
    noise = torch.randn_like(base.hidden_states[1])
    patched = trace(model, ids, patches={"model.layers.0": at_positions(noise, 4)})
    assert torch.equal(patched.logits[:, :4], base.logits[:, :4])  # causal: earlier positions cannot see it
    assert (patched.logits[:, 4:] - base.logits[:, 4:]).abs().amax(dim=-1).min() > 0
    assert torch.equal(patched.hidden_states[1][:, 4], noise[:, 4])  # recordings show the patched value


def test_patching_the_last_block_predicts_the_logits() -> None:
    """Logits are lm_head(norm(last residual)): patch that residual and the logits follow exactly."""
    model = random_model(tiny_config())
    ids = sample_ids(model.config)
    replacement = torch.randn(2, 9, model.config.hidden_size)
    patched = trace(model, ids, patches={"model.layers.1": replacement})
    with torch.no_grad():
        assert torch.equal(patched.logits, model.lm_head(model.model.norm(replacement)))


def test_logit_lens_last_layer_is_the_model_output() -> None:
    model = random_model(tiny_config())
    result = trace(model, sample_ids(model.config))
    lens = logit_lens(model, result.hidden_states)
    assert lens.shape == (3, 2, 9, model.config.vocab_size)
    assert torch.equal(lens[-1], result.logits)


def test_recording_and_patching_context_managers_keep_gradients_flowing() -> None:
    model = random_model(tiny_config())
    ids = sample_ids(model.config)
    with recording(model, ["model.layers.0.mlp"]) as records, patching(model, {"model.layers.1.mlp": torch.zeros(2, 9, 32)}):
        model(ids).sum().backward()
    assert records["model.layers.0.mlp"].shape == (2, 9, 32)
    assert model.model.layers[1].mlp.down_proj.weight.grad is None  # zeroed out: no gradient reaches it
    assert model.model.layers[0].mlp.down_proj.weight.grad is not None


def test_bad_points_and_patches_are_clear_errors() -> None:
    model = random_model(tiny_config())
    ids = sample_ids(model.config)
    with pytest.raises(ValueError, match="no module named 'model.layers.7'"):
        trace(model, ids, capture=["model.layers.7"])
    with pytest.raises(ValueError, match=r"patch for 'model.layers.0' has shape \(1, 2\), the output there is \(2, 9, 32\)"):
        trace(model, ids, patches={"model.layers.0": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match="can be read, not patched"):
        trace(model, ids, patches={"model.layers.0.self_attn.attention_probs": torch.zeros(1)})
    for name, module in model.named_modules():  # a failed call leaves no hooks behind
        assert not module._forward_hooks, f"hook left on {name}"



def test_previous_token_score_finds_a_previous_token_head() -> None:
    seq = 5
    previous = torch.zeros(seq, seq)
    previous[0, 0] = 1
    previous[torch.arange(1, seq), torch.arange(seq - 1)] = 1  # every query looks one back
    uniform = torch.ones(seq, seq).tril() / torch.arange(1, seq + 1)[:, None]
    scores = previous_token_score(torch.stack([previous, uniform])[None])  # (batch=1, heads=2)
    torch.testing.assert_close(scores, torch.tensor([[1.0, (1 / 2 + 1 / 3 + 1 / 4 + 1 / 5) / 4]]))


def test_exercise_previous_token_score(capsys) -> None:
    def answer(probs):  # the notebook's solution, written independently
        seq = probs.shape[-1]
        return probs[..., torch.arange(1, seq), torch.arange(seq - 1)].mean(dim=-1)

    def wrong(probs):  # one attention weight, not the previous-token mean
        return probs[..., 0, 0]

    assert_exercise_check(check_exercise_previous_token_score, answer, wrong, capsys, match="previous-token score")
