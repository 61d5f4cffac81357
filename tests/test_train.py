"""Training from scratch: schedule, data, an AdamW step by hand, checkpoints, kill-and-resume."""

from __future__ import annotations

import argparse
import importlib
import json
import math
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from helpers import assert_exercise_check, random_model, tiny_config

import minqwen
from minqwen.exercises import check_exercise_cosine_lr
from minqwen.loss import lm_loss
from minqwen.recipes import add_dataclass_arguments, dataclass_from_args
from minqwen.recipes.train_tiny import TextData, TrainConfig, byte_tokenizer, lr_at, train
from minqwen.training import STATE_FILE, CausalLMLoss, checkpoint_dirs, make_optimizer, train_step

# A run small enough to take a second or two: 2 layers of width 32, 32-byte windows.
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            seq_len=32, batch_size=4, warmup_steps=5, lr=1e-2, min_lr=1e-3, eval_batches=2, sample_tokens=20, threads=1)


def tiny_run(out_dir: Path, **overrides) -> TrainConfig:
    return TrainConfig(**{**TINY, "out_dir": str(out_dir), **overrides})


def cli_args(config: TrainConfig) -> list[str]:
    return [arg for name, value in vars(config).items() for arg in (f"--{name.replace('_', '-')}", str(value))]


def saved_losses(out_dir: Path) -> list[float]:
    return json.loads((checkpoint_dirs(out_dir)[-1] / STATE_FILE).read_text())["losses"]


def test_lr_warms_up_then_decays_along_a_cosine() -> None:
    config = TrainConfig(steps=100, warmup_steps=10, lr=1.0, min_lr=0.1)
    lrs = [lr_at(step, config) for step in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[99] == pytest.approx(0.1)
    assert lr_at(10 + 89 // 2, config) == pytest.approx(0.55, abs=0.01)  # half way down the cosine
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))


def test_batches_depend_only_on_seed_and_step(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    text.write_text("abcdefghij" * 100)
    data = TextData.from_file(text, seq_len=8, val_fraction=0.2)
    assert len(data.train) == 800 and len(data.val) == 200
    first = data.batch("train", 0, 5, 3, 8)
    assert first.shape == (3, 8)
    assert torch.equal(first, data.batch("train", 0, 5, 3, 8))
    assert not torch.equal(first, data.batch("train", 0, 6, 3, 8))
    assert byte_tokenizer().decode(first[0].tolist()) in "abcdefghij" * 100


def test_one_train_step_equals_adamw_by_hand() -> None:
    """The step applies: clip the global norm, m/v moments with bias correction, decoupled decay
    on matrices only -- written out here from the AdamW paper (Loshchilov & Hutter)."""
    model = random_model(tiny_config()).train()
    config = TrainConfig(weight_decay=0.1, grad_clip=0.5)
    ids = torch.randint(0, 257, (2, 12), generator=torch.Generator().manual_seed(0))
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    lm_loss(model, ids).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    lr, beta1, beta2, eps = 2e-3, 0.9, 0.95, 1e-8
    loss, grad_norm = train_step(CausalLMLoss(model), make_optimizer(model, config), ids, lr, config.grad_clip)

    total_norm = torch.cat([g.flatten() for g in grads.values()]).norm()
    assert grad_norm == pytest.approx(total_norm.item(), rel=1e-5)
    clip = min(1.0, config.grad_clip / (total_norm.item() + 1e-6))
    for name, p in model.named_parameters():
        g = grads[name] * clip
        m, v = (1 - beta1) * g, (1 - beta2) * g * g
        m_hat, v_hat = m / (1 - beta1), v / (1 - beta2)
        decay = config.weight_decay if p.dim() >= 2 else 0.0
        expected = before[name] * (1 - lr * decay) - lr * m_hat / (v_hat.sqrt() + eps)
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-7, msg=name)


def test_training_lowers_the_loss_and_writes_loadable_checkpoints(tmp_path: Path) -> None:
    config = tiny_run(tmp_path / "run", steps=60, checkpoint_every=20, eval_every=30, keep_checkpoints=2)
    state = train(config)
    assert len(state.losses) == 60
    assert sum(state.losses[-10:]) / 10 < sum(state.losses[:10]) / 10 - 1.0
    assert [e["step"] for e in state.evals] == [30, 60]
    assert [p.name for p in checkpoint_dirs(config.out_dir)] == ["step-000040", "step-000060"]
    assert all(p.stat().st_mode & 0o777 == 0o644 for p in checkpoint_dirs(config.out_dir)[-1].iterdir())

    final = checkpoint_dirs(config.out_dir)[-1]
    model = minqwen.from_pretrained(final)
    tokenizer = minqwen.Tokenizer.from_pretrained(final)
    ids = torch.tensor([tokenizer.encode("def f(x):\n    return x")])
    assert ids[0].tolist() == list(b"def f(x):\n    return x")
    data = TextData.from_file(config.text, config.seq_len, config.val_fraction)
    with torch.no_grad():
        assert lm_loss(model, data.batch("val", 0, -1, 4, 32)).item() == pytest.approx(state.evals[-1]["val"], abs=0.5)


def test_checkpoint_loads_in_hf_transformers(tmp_path: Path) -> None:
    import tokenizers
    import transformers

    config = tiny_run(tmp_path / "run", steps=3, checkpoint_every=3)
    train(config)
    final = checkpoint_dirs(config.out_dir)[-1]
    ours = minqwen.from_pretrained(final)
    hf = transformers.Qwen2ForCausalLM.from_pretrained(final).eval()
    ids = torch.tensor([list(b"import os\n")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=1e-5, atol=1e-5)
    assert tokenizers.Tokenizer.from_file(str(final / "tokenizer.json")).encode("héllo").ids == list("héllo".encode())


def test_killed_run_resumes_to_the_same_losses(tmp_path: Path) -> None:
    """Kill a training process right after a checkpoint, start it again: same losses as never stopped."""
    steps = 100
    uninterrupted = tiny_run(tmp_path / "straight", steps=steps, checkpoint_every=10, eval_every=1000)
    train(uninterrupted)

    interrupted = tiny_run(tmp_path / "killed", steps=steps, checkpoint_every=10, eval_every=1000)
    command = [sys.executable, "-m", "minqwen", "train", *cli_args(interrupted)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        if line.startswith("checkpoint step 20 "):
            process.send_signal(signal.SIGKILL)
            break
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = json.loads((checkpoint_dirs(interrupted.out_dir)[-1] / STATE_FILE).read_text())["step"]
    assert 20 <= killed_at < steps

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed from {checkpoint_dirs(interrupted.out_dir)[0].parent}" in resumed.stdout
    assert saved_losses(interrupted.out_dir) == saved_losses(uninterrupted.out_dir)


def test_resuming_with_other_settings_is_a_clear_error(tmp_path: Path) -> None:
    train(tiny_run(tmp_path / "run", steps=2, checkpoint_every=2))
    with pytest.raises(ValueError, match=r"cannot resume from .*step-000002.*hidden_size: checkpoint 32, now 64"):
        train(tiny_run(tmp_path / "run", steps=4, hidden_size=64))
    other_text = tmp_path / "other.txt"
    other_text.write_text("x" * 5000)
    with pytest.raises(ValueError, match="the training text is not the one the checkpoint was trained on"):
        train(tiny_run(tmp_path / "run", steps=2, text=str(other_text)))


def test_changing_bookkeeping_settings_resumes(tmp_path: Path) -> None:
    train(tiny_run(tmp_path / "run", steps=4, checkpoint_every=2))
    state = train(tiny_run(tmp_path / "run", steps=4, checkpoint_every=1, log_every=1))
    assert len(state.losses) == 4


def test_partial_checkpoints_are_ignored_and_cleaned_up(tmp_path: Path) -> None:
    config = tiny_run(tmp_path / "run", steps=2, checkpoint_every=2)
    partial = tmp_path / "run" / ".step-000001.abc"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"half")
    state = train(config)
    assert len(state.losses) == 2 and not partial.exists()


def test_bad_settings_and_texts_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="these settings must be >= 1: steps=0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="need 0 < min_lr <= lr"):
        TrainConfig(lr=1e-4, min_lr=1e-3)
    with pytest.raises(FileNotFoundError, match="training text .*missing.txt not found"):
        train(tiny_run(tmp_path / "run", text=str(tmp_path / "missing.txt")))
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ValueError, match="9 tokens is too short for seq_len=32"):
        train(tiny_run(tmp_path / "run", text=str(short)))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe" * 1000)
    with pytest.raises(ValueError, match="is not UTF-8 text"):
        train(tiny_run(tmp_path / "run", text=str(binary)))


def test_default_text_is_shipped_and_small() -> None:
    config = TrainConfig()
    size = Path(config.text).stat().st_size
    assert 100_000 < size < 1_000_000
    assert math.isclose(lr_at(config.steps - 1, config), config.min_lr)


def test_exercise_cosine_lr(capsys) -> None:
    def answer(step, steps, warmup_steps, lr, min_lr):  # the notebook's solution, written independently
        if step < warmup_steps:
            return lr * (step + 1) / warmup_steps
        progress = (step - warmup_steps) / (steps - 1 - warmup_steps)
        return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2

    def wrong(step, steps, warmup_steps, lr, min_lr):  # a constant rate
        return lr

    assert_exercise_check(check_exercise_cosine_lr, answer, wrong, capsys, match="warm-up \\+ cosine schedule")


@dataclass
class Flags:
    verbose: bool = field(default=True, metadata={"help": "say more"})
    steps: int = field(default=3, metadata={"help": "how many"})
    lr: float = 0.5
    name: str = "run"


def test_dataclass_flags_parse_booleans_and_types() -> None:
    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Flags)
    parse = lambda *argv: dataclass_from_args(Flags, parser.parse_args(argv))  # noqa: E731
    assert parse() == Flags()
    assert parse("--verbose", "False", "--steps", "7", "--lr", "0.1", "--name", "x") == Flags(False, 7, 0.1, "x")
    assert parse("--verbose", "yes").verbose is True and parse("--verbose", "0").verbose is False
    with pytest.raises(SystemExit):
        parse("--verbose", "maybe")
    assert "say more (default: True)" in parser.format_help()


@pytest.mark.parametrize(
    "old,new,name",
    [
        ("minqwen.train", "minqwen.recipes.train_tiny", "TrainConfig"),
        ("minqwen.train", "minqwen.training", "train_step"),
        ("minqwen.lora_demo", "minqwen.recipes.lora_demo", "run_demo"),
    ],
)
def test_old_module_paths_warn_and_still_work(old, new, name, monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=old):
        module = importlib.import_module(old)
    assert getattr(module, name) is getattr(importlib.import_module(new), name)
