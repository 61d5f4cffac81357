"""Sliding-window perplexity: every token scored once, equal to a per-token reference with HF's model."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import hf_twin, random_model, tiny_config
from test_train import tiny_run

from minqwen.evaluate import perplexity, windows
from minqwen.recipes.train_tiny import train
from minqwen.training import checkpoint_dirs


def test_windows_score_every_token_but_the_first_exactly_once() -> None:
    for n, context, stride in [(10, 4, 2), (10, 4, 3), (7, 8, 4), (100, 16, 1), (33, 10, 9)]:
        scored = [t for begin, end, first in windows(n, context, stride) for t in range(first, end)]
        assert scored == list(range(1, n)), (n, context, stride)
        for begin, end, first in windows(n, context, stride):
            assert end - begin <= context and begin < first


def reference_nll(hf_model, ids: torch.Tensor, context: int, stride: int) -> float:
    """Per-token log-probabilities from HF's model, each token scored in the window that scores it."""
    nlls = []
    for begin, end, first in windows(len(ids), context, stride):
        with torch.no_grad():
            logprobs = hf_model(ids[begin:end][None]).logits[0].log_softmax(-1)  # (seq, vocab)
        for t in range(first, end):
            nlls.append(-logprobs[t - 1 - begin, ids[t]].item())
    return sum(nlls) / len(nlls)


@pytest.mark.parametrize("context, stride", [(64, 32), (16, 5), (16, 15)])
def test_perplexity_equals_a_per_token_reference_with_hf(context: int, stride: int) -> None:
    model = random_model(tiny_config(max_position_embeddings=64))
    ids = torch.randint(0, 257, (50,), generator=torch.Generator().manual_seed(0))
    result = perplexity(model, ids, context, stride)
    expected = reference_nll(hf_twin(model), ids, context, stride)
    assert result.tokens == 49
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)


def test_one_window_is_the_plain_loss() -> None:
    from minqwen.loss import lm_loss

    model = random_model(tiny_config())
    ids = torch.randint(0, 257, (20,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert perplexity(model, ids, 32).nll == pytest.approx(lm_loss(model, ids[None]).item(), rel=1e-6)


def test_bad_settings_are_clear_errors() -> None:
    model = random_model(tiny_config(max_position_embeddings=64))
    ids = list(range(30))
    with pytest.raises(ValueError, match=r"context_length must be in \[2, max_position_embeddings=64\], got 100"):
        perplexity(model, ids, 100)
    with pytest.raises(ValueError, match=r"stride must be in \[1, context_length - 1 = 15\], got 16"):
        perplexity(model, ids, 16, 16)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, [5], 16)


def test_eval_command_on_a_trained_checkpoint(tmp_path: Path) -> None:
    """`python -m minqwen eval` on a model from `train`: its tokenizer.json makes bytes the tokens."""
    config = tiny_run(tmp_path / "run", steps=2, checkpoint_every=2)
    train(config)
    text = tmp_path / "sample.txt"
    text.write_text("def add(a, b):\n    return a + b\n" * 4)
    command = [sys.executable, "-m", "minqwen", "eval", "--text", str(text), "--checkpoint", str(checkpoint_dirs(config.out_dir)[-1]),
               "--context-length", "32", "--stride", "16"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    num_bytes = len(text.read_bytes())
    assert f"{num_bytes - 1} tokens scored in {len(windows(num_bytes, 32, 16))} windows of 32 | perplexity" in result.stdout

    missing = subprocess.run([*command[:5], str(tmp_path / "nope.txt")], capture_output=True, text=True, timeout=300)
    assert missing.returncode == 1 and "text file" in missing.stderr and "not found" in missing.stderr
