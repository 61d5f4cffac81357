"""The long-context extrapolation experiment: its data, its measures, its JSON and its command line."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from minqwen.loss import lm_loss
from minqwen.model import Qwen2ForCausalLM
from minqwen.recipes.extrapolation import (
    KEY_DIGITS,
    METHODS,
    NEEDLE,
    QUESTION,
    DcaChoice,
    ExperimentConfig,
    by_depth,
    cached_model,
    checkpoint_dir,
    dca_distances,
    evaluate_method,
    passkey_example,
    passkey_examples,
    passkey_hits,
    passkey_overhead,
    position_losses,
    training_batch,
    training_distances,
    wilson_interval,
)
from minqwen.recipes.train_tiny import DEFAULT_TEXT, TextData

ROOT = Path(__file__).resolve().parents[1]
# A run of seconds: the --quick model (2 layers of width 64) trained 15 steps at 128 tokens, tested at 1x, 4x and 8x.
MICRO = ["--quick", "--steps", "15", "--trials", "10", "--threads", "1"]


# --------------------------------------------------------------------------- data
def test_passkey_example_places_the_key_at_the_depth_and_ends_with_it():
    for length, depth in [(128, 0.0), (128, 0.5), (512, 0.3), (1024, 1.0)]:
        example = passkey_example(length, depth, random.Random(length))
        text = bytes(example.ids).decode("ascii")
        needle = NEEDLE.format(key=example.key)
        assert len(example.ids) == length
        assert len(example.key) == KEY_DIGITS and example.key.isdigit()
        assert sum(c.isdigit() for c in text) == 2 * KEY_DIGITS
        assert text.endswith(QUESTION + example.key)
        assert text[example.answer_start :] == example.key
        assert text[example.needle_start : example.needle_start + len(needle)] == needle
        assert text.count("pass key=") == 2  # the needle and the question, nothing else
        assert len(set(example.key)) == KEY_DIGITS
        filler_len = length - passkey_overhead()
        assert example.depth == example.needle_start / filler_len
        assert abs(example.depth - depth) <= 6 / filler_len  # nearest word start
        assert example.needle_start in (0, filler_len) or text[example.needle_start - 1] == " "  # a word start


def test_passkey_example_depth_ends_and_bad_input():
    first = passkey_example(256, 0.0, random.Random(0))
    last = passkey_example(256, 1.0, random.Random(0))
    assert first.needle_start == 0 and first.depth == 0.0
    last_text = bytes(last.ids).decode("ascii")
    assert last_text[: last.answer_start].endswith(NEEDLE.format(key=last.key) + QUESTION)
    with pytest.raises(ValueError, match="too short"):
        passkey_example(passkey_overhead(), 0.5, random.Random(0))
    with pytest.raises(ValueError, match="depth"):
        passkey_example(256, 1.5, random.Random(0))


def test_passkey_examples_are_deterministic_and_spread_over_depths():
    examples = passkey_examples(256, 20, 5, seed=3)
    assert [e.ids for e in examples] == [e.ids for e in passkey_examples(256, 20, 5, seed=3)]
    assert [e.ids for e in examples] != [e.ids for e in passkey_examples(256, 20, 5, seed=4)]
    assert len({e.key for e in examples}) > 15
    depths = [e.depth for e in examples]
    for d, target in enumerate([0.0, 0.25, 0.5, 0.75, 1.0]):  # laid out depth-major: example i at depth i % 5
        assert all(abs(x - target) < 0.05 for x in depths[d::5])
    assert by_depth(examples, [i % 5 == 2 for i in range(20)], 5) == [0.0, 0.0, 1.0, 0.0, 0.0]


def test_training_batch_scores_text_everywhere_and_passkeys_on_the_answer_only():
    config = ExperimentConfig(batch_size=6, passkey_fraction=0.5, trials=10, sweep_trials=10)
    text = TextData.from_file(DEFAULT_TEXT, 2048, 0.1)
    ids, labels = training_batch(text, config, step=7)
    assert ids.shape == labels.shape == (6, config.trained_length)
    assert torch.equal(labels[:3], ids[:3])
    assert (labels[3:, :-KEY_DIGITS] == -100).all()
    assert torch.equal(labels[3:, -KEY_DIGITS:], ids[3:, -KEY_DIGITS:])
    assert all(bytes(row[-KEY_DIGITS:].tolist()).decode().isdigit() for row in ids[3:])
    again, _ = training_batch(text, config, step=7)
    other, _ = training_batch(text, config, step=8)
    assert torch.equal(ids, again) and not torch.equal(ids, other)


# --------------------------------------------------------------------------- measures
class NextTokenOracle(nn.Module):
    """A stand-in for a model that predicts the next token everywhere except at position ``wrong_at``."""

    def __init__(self, wrong_at: int | None = None) -> None:
        super().__init__()
        self.wrong_at = wrong_at
        self.lm_head = nn.Identity()

    def model(self, ids: torch.Tensor) -> torch.Tensor:
        """Hidden state at t = one-hot of token t + 1 (of token 0 at ``wrong_at``); the head is the identity."""
        targets = torch.roll(ids, -1, dims=1)
        if self.wrong_at is not None:
            targets[:, self.wrong_at] = 0
        return torch.nn.functional.one_hot(targets, 256).float()


def test_passkey_hits_reads_exactly_the_predictions_of_the_answer_digits():
    examples = passkey_examples(200, 6, 3, seed=0)
    assert passkey_hits(NextTokenOracle(), examples) == [True] * 6
    # the key's digits are tokens -5..-1, predicted at positions -6..-2
    assert passkey_hits(NextTokenOracle(wrong_at=-6), examples) == [False] * 6
    assert passkey_hits(NextTokenOracle(wrong_at=-2), examples) == [False] * 6
    assert passkey_hits(NextTokenOracle(wrong_at=-7), examples) == [True] * 6
    assert passkey_hits(NextTokenOracle(wrong_at=-1), examples) == [True] * 6


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = ExperimentConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, trials=10, sweep_trials=10)
    return Qwen2ForCausalLM(config.model_config()).eval(), config


def test_every_method_runs_and_restores_the_model(tiny_model):
    model, config = tiny_model
    L, dca = config.trained_length, DcaChoice(96, 8)
    text = TextData.from_file(DEFAULT_TEXT, 4 * L, 0.1)
    results = {}
    for length in (L, 4 * L):
        examples = passkey_examples(length, 4, 2, seed=0)
        windows = torch.cat([text.batch("val", 0, -1 - i, 1, length) for i in range(2)])
        for method in METHODS:
            cell = evaluate_method(model, method, length, config, dca, examples, windows)
            assert len(cell["hits"]) == 4 and cell["losses"].shape == (length - 1,)
            assert model.config.max_position_embeddings == L
            assert model.config.rope_scaling is None and model.config.dual_chunk_attention_config is None
            results[method, length] = cell["losses"]
    for method in ("linear", "dynamic", "yarn"):  # factor 1 at the trained length: plain RoPE exactly
        torch.testing.assert_close(results[method, L], results["rope", L])
    for method in ("linear", "dynamic", "yarn", "dca"):  # past it, each scheme changes the positions
        assert not torch.allclose(results[method, 4 * L], results["rope", 4 * L])


def test_position_losses_average_to_the_lm_loss(tiny_model):
    model, _ = tiny_model
    windows = torch.randint(0, 256, (3, 64), generator=torch.Generator().manual_seed(0))
    losses = position_losses(model, windows)
    assert losses.shape == (63,)
    torch.testing.assert_close(losses.mean(), lm_loss(model, windows), rtol=1e-5, atol=1e-5)


def test_wilson_interval():
    assert wilson_interval(0, 100) == pytest.approx([0.0, 0.037], abs=1e-3)
    assert wilson_interval(50, 100) == pytest.approx([0.4038, 0.5962], abs=1e-3)
    assert wilson_interval(100, 100) == pytest.approx([0.963, 1.0], abs=1e-3)
    with pytest.raises(ValueError):
        wilson_interval(0, 0)


def test_dca_distances_stay_within_the_chunk():
    L = 128
    assert sum(training_distances(L)) == L * (L + 1) // 2 and training_distances(L)[-1] == 1
    for chunk in (128, 96, 64):
        found = dca_distances(DcaChoice(chunk, 8), 8 * L, L)
        assert found["max_distance"] <= chunk
        assert sum(found["counts"]) == 8 * L * (8 * L + 1) // 2  # every causal pair once
        low, high = found["last_query_inter_range"]
        assert 8 < low and high <= chunk  # far keys all sit between the local size and the chunk size
    assert dca_distances(DcaChoice(128, 8), 8 * L, L)["share_at_or_beyond_L"] > 0  # chunk = L reaches distance L
    assert dca_distances(DcaChoice(96, 8), 8 * L, L)["share_at_or_beyond_L"] == 0


# --------------------------------------------------------------------------- the command line and its JSON
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``python -m minqwen.recipes.extrapolation --quick`` with a temporary cache and output."""
    tmp = tmp_path_factory.mktemp("extrapolation")
    env = {**os.environ, "MINQWEN_CACHE": str(tmp / "cache"), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "minqwen.recipes.extrapolation", *MICRO, "--out", str(tmp / "out" / "results.json")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return tmp, done.stdout


def test_quick_run_trains_caches_and_prints_the_table(quick_run):
    tmp, stdout = quick_run
    assert "step 15/15" in stdout and "passkey accuracy / text loss" in stdout and "dca_scaled" in stdout
    [checkpoint] = (tmp / "cache" / "extrapolation").iterdir()
    assert sorted(p.name for p in checkpoint.iterdir()) == ["config.json", "model.safetensors", "settings.json"]
    assert [p.name for p in (tmp / "out").iterdir()] == ["results.json"]  # no temporary file left beside it


def test_cached_model_trains_once_then_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("MINQWEN_CACHE", str(tmp_path))
    config = ExperimentConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, steps=2, batch_size=4,
                              trials=10, sweep_trials=10, threads=1)
    text = TextData.from_file(DEFAULT_TEXT, 1024, 0.1)
    trained, cached = cached_model(config, text)
    loaded, cached_again = cached_model(config, text)
    assert (cached, cached_again) == (False, True)
    assert checkpoint_dir(config, text.sha256).parent == tmp_path / "extrapolation"
    for name, tensor in trained.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor, rtol=0, atol=0)
    other = dataclasses.replace(config, seed=1)
    assert checkpoint_dir(other, text.sha256) != checkpoint_dir(config, text.sha256)
    assert [p.name for p in tmp_path.joinpath("extrapolation").iterdir()] == [checkpoint_dir(config, text.sha256).name]


def test_results_json_schema(quick_run):
    tmp, _ = quick_run
    results = json.loads((tmp / "out" / "results.json").read_text())
    L = results["trained_length"]
    assert L == 128 and results["trials"] == 10 and results["seed"] == 0
    assert results["model"]["max_position_embeddings"] == L and results["model"]["num_hidden_layers"] == 2
    lengths = [L, 4 * L, 8 * L]
    assert [(r["method"], r["length"]) for r in results["rows"]] == [(m, n) for n in lengths for m in METHODS]
    for row in results["rows"]:
        assert set(row) == {"method", "length", "passkey_accuracy", "passkey_ci95", "loss"}
        low, high = row["passkey_ci95"]
        assert 0 <= low <= row["passkey_accuracy"] <= high <= 1
        assert row["loss"] > 0
    assert set(results["loss_by_position"]) == set(METHODS)
    for curve in results["loss_by_position"].values():
        positions = [p for p, _ in curve]
        assert positions == sorted(positions) and positions[0] == 1 and positions[-1] < 8 * L
        assert all(loss > 0 for _, loss in curve)
    depth = results["by_depth"]
    assert len(depth["depths"]) == 5 and set(depth["accuracy"]) == set(METHODS)
    assert all(len(accs) == 5 for method in depth["accuracy"].values() for accs in method.values())
    chosen = results["dca_settings"]
    assert {(r["chunk_size"], r["local_size"]) for r in results["chunk_sweep"]} == {(128, 16), (96, 16), (64, 16)}
    assert (chosen["chunk_size"], chosen["local_size"]) in {(r["chunk_size"], r["local_size"]) for r in results["chunk_sweep"]}
    assert len(results["training_distance_counts"]) == L
    for key in ("date", "machine", "torch", "cpu_seconds"):
        assert key in results
