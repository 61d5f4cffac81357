"""Data-parallel training under torchrun (2 processes, gloo): the same as one process on the whole batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from test_train import STATE_FILE, cli_args, tiny_run

from minqwen.loss import lm_loss
from minqwen.recipes.train_tiny import TextData, TrainConfig, new_model, train
from minqwen.training import checkpoint_dirs
from minqwen.loading.weights import read_safetensors

TESTS = Path(__file__).parent


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ...``, failing the test with its output on error."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=TESTS)
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_ddp_gradients_equal_single_process_gradients_on_the_whole_batch(tmp_path: Path) -> None:
    out = tmp_path / "grads.safetensors"
    torchrun(str(TESTS / "ddp_gradients.py"), str(out))
    ddp_grads = read_safetensors(out)

    config = TrainConfig(hidden_size=32, num_hidden_layers=2, intermediate_size=64, seq_len=32, batch_size=8)
    model = new_model(config)
    data = TextData.from_file(config.text, config.seq_len, config.val_fraction)
    lm_loss(model, data.batch("train", config.seed, 0, config.batch_size, config.seq_len)).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(ddp_grads[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_ddp_training_run_equals_single_process_run(tmp_path: Path) -> None:
    single = tiny_run(tmp_path / "single", steps=20, checkpoint_every=10, eval_every=1000)
    train(single)
    ddp = tiny_run(tmp_path / "ddp", steps=20, checkpoint_every=10, eval_every=1000)
    result = torchrun("-m", "minqwen", "train", *cli_args(ddp))

    assert result.stdout.count("checkpoint step 20 ") == 1, "only rank 0 logs and checkpoints"
    assert "(2 processes)" in result.stdout
    ddp_losses = json.loads((checkpoint_dirs(ddp.out_dir)[-1] / STATE_FILE).read_text())["losses"]
    single_losses = json.loads((checkpoint_dirs(single.out_dir)[-1] / STATE_FILE).read_text())["losses"]
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single_losses), rtol=1e-4, atol=1e-5)
    ddp_weights = read_safetensors(checkpoint_dirs(ddp.out_dir)[-1] / "model.safetensors")
    single_weights = read_safetensors(checkpoint_dirs(single.out_dir)[-1] / "model.safetensors")
    for name in single_weights:
        torch.testing.assert_close(ddp_weights[name], single_weights[name], rtol=1e-4, atol=1e-5, msg=name)
