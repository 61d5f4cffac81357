"""Data-parallel training under torchrun (2 processes, gloo on the CPU, even where there are GPUs):
the same as one process on the whole batch. And which backend and device each process picks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from test_train import STATE_FILE, cli_args, tiny_run

from minqwen.loss import lm_loss
from minqwen.recipes.train_tiny import TextData, TrainConfig, new_model, train
from minqwen.training import backend_and_device, checkpoint_dirs
from minqwen.loading.weights import read_safetensors

TESTS = Path(__file__).parent


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node 2 ...`` with no GPU visible (so gloo on the CPU, which
    gives the single-process CPU run's numbers on any machine), failing the test with its output on error."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=TESTS, env=env)
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


@pytest.mark.parametrize(
    ("gpus", "env", "expected"),
    [
        (0, {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, ("gloo", "cpu")),
        (2, {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, ("nccl", "cuda:1")),
        (8, {"LOCAL_RANK": "3", "LOCAL_WORLD_SIZE": "4", "WORLD_SIZE": "16"}, ("nccl", "cuda:3")),  # 4 machines of 4
        (1, {"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, ("gloo", "cpu")),  # not cuda:1, which does not exist
        (1, {"LOCAL_RANK": "1", "WORLD_SIZE": "2"}, ("gloo", "cpu")),  # no LOCAL_WORLD_SIZE: WORLD_SIZE counts
    ],
)
def test_backend_and_device_give_each_process_its_own_gpu_or_fall_back_to_the_cpu(
    monkeypatch: pytest.MonkeyPatch, gpus: int, env: dict[str, str], expected: tuple[str, str]
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    backend, device = backend_and_device(env)
    assert (backend, device) == (expected[0], torch.device(expected[1]))


def test_too_few_gpus_for_the_processes_warns_once_from_local_rank_0(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.warns(UserWarning, match="2 processes but 1 GPU.*CPU"):
        backend_and_device({"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        backend_and_device({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})  # the other processes stay quiet
