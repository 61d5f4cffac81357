"""Reusable pieces of a training loop: schedule, optimizer, loss module, one step, checkpoints, DDP.

The loop they make is the classic one (as in nanoGPT): compute the next-token loss, backpropagate,
clip the gradient norm, take an AdamW step with a learning rate that warms up linearly and then
decays along a cosine. :mod:`minqwen.recipes.train_tiny` (a tiny Qwen2 from scratch) and
:mod:`minqwen.recipes.lora_demo` (LoRA on the real 0.5B) are both built from them.

Checkpoints are HF-format directories (``config.json``, ``model.safetensors``) plus the AdamW
moments and a JSON record of the run, written under a temporary name and renamed, so a run killed
while writing never leaves a checkpoint that looks complete.

Data parallel: started under ``torchrun --nproc_per_node N``, :class:`Processes` gives each
process 1/N of every batch and :class:`~torch.nn.parallel.DistributedDataParallel` averages the
gradients, so N processes take the same steps as one process with the whole batch.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

from .loss import lm_loss
from .model import Qwen2ForCausalLM
from .loading.files import atomic_directory
from .loading.weights import check_state_dict, read_safetensors, save_pretrained

STATE_FILE = "train_state.json"  # written last: a checkpoint directory without it is incomplete
OPTIMIZER_FILE = "optimizer.safetensors"
CHECKPOINT_PREFIX = "step-"


# --------------------------------------------------------------------------- schedule and optimizer
def cosine_lr(step: int, steps: int, warmup_steps: int, lr: float, min_lr: float) -> float:
    """Linear warm-up to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at step ``steps - 1``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - 1 - warmup_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


class OptimizerSettings(Protocol):
    """What :func:`make_optimizer` reads from a run's settings (a ``TrainConfig`` has both)."""

    lr: float
    weight_decay: float


def make_optimizer(model: nn.Module, settings: OptimizerSettings) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with weight decay on matrices only: decaying norms
    and biases only hurts (nanoGPT). betas (0.9, 0.95) as in most LLM pre-training."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8)


# --------------------------------------------------------------------------- loss and step
class CausalLMLoss(nn.Module):
    """A model whose forward returns :func:`minqwen.lm_loss` -- the unit DDP wraps, so that the
    gradient averaging it sets up in forward covers the whole loss computation."""

    def __init__(self, model: Qwen2ForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return lm_loss(self.model, input_ids, labels)


def train_step(
    loss_fn: nn.Module, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor, lr: float, grad_clip: float,
    labels: torch.Tensor | None = None,
) -> tuple[float, float]:
    """One optimizer step on a batch; returns (loss, gradient norm before clipping)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(input_ids, labels)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return loss.item(), grad_norm.item()


# --------------------------------------------------------------------------- checkpoints
@dataclass
class TrainState:
    """Where a run is: the next step to take and the history so far."""

    step: int = 0
    losses: list[float] = field(default_factory=list)  # training loss of every step taken
    evals: list[dict[str, float]] = field(default_factory=list)  # e.g. {"step", "train", "val"}


def checkpoint_dirs(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``out_dir``, oldest first."""
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.glob(f"{CHECKPOINT_PREFIX}*") if (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def remove_partial_checkpoints(out_dir: str | os.PathLike) -> None:
    """Delete temporary directories left by a run killed while writing a checkpoint."""
    for partial in Path(out_dir).glob(f".{CHECKPOINT_PREFIX}*"):
        shutil.rmtree(partial, ignore_errors=True)


def save_checkpoint(
    out_dir: str | os.PathLike, model: Qwen2ForCausalLM, optimizer: torch.optim.Optimizer, state: TrainState,
    run_record: Mapping[str, Any], keep: int, extra_files: Mapping[str, str] | None = None,
) -> Path:
    """Write ``out_dir/step-NNNNNN`` atomically (built under a temporary name, then renamed).

    It holds the model (HF format), the optimizer's state, ``extra_files`` (name -> text, e.g. a
    ``tokenizer.json``) and :data:`STATE_FILE`: the state plus ``run_record`` (what the run
    needs to check a resume). Only the ``keep`` newest checkpoints are kept.
    """
    out_dir = Path(out_dir)
    target = out_dir / f"{CHECKPOINT_PREFIX}{state.step:06d}"
    with atomic_directory(target) as tmp:
        save_pretrained(model, tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        save_file(optimizer_tensors(model, optimizer), str(tmp / OPTIMIZER_FILE))
        record = {"step": state.step, "losses": state.losses, "evals": state.evals, **run_record}
        (tmp / STATE_FILE).write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    for old in checkpoint_dirs(out_dir)[:-keep]:
        shutil.rmtree(old)
    return target


def optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW's state as named tensors (``<param>.exp_avg``, ``.exp_avg_sq``, ``.step``) for safetensors."""
    tensors = {}
    for name, param in model.named_parameters():
        for key, value in optimizer.state.get(param, {}).items():
            tensors[f"{name}.{key}"] = torch.as_tensor(value).detach().clone().contiguous()
    return tensors


def load_checkpoint(
    path: Path, model: Qwen2ForCausalLM, optimizer: torch.optim.Optimizer,
    check: Callable[[dict[str, Any]], None] = lambda record: None,
) -> TrainState:
    """Restore weights and optimizer state in place; returns the run's state.

    ``check(record)`` sees the checkpoint's :data:`STATE_FILE` record first and raises if the
    checkpoint does not belong to this run, before anything is loaded.
    """
    record = json.loads((path / STATE_FILE).read_text(encoding="utf-8"))
    check(record)
    weights = read_safetensors(path / "model.safetensors")
    check_state_dict(model.config, weights, str(path))
    with torch.no_grad():
        for name, value in weights.items():  # a tied head is the embedding: copying it once covers both
            model.get_parameter(name).copy_(value)
    saved = read_safetensors(path / OPTIMIZER_FILE)
    for name, param in model.named_parameters():
        if param.requires_grad:
            optimizer.state[param] = {key: saved[f"{name}.{key}"].clone() for key in ("step", "exp_avg", "exp_avg_sq")}
    return TrainState(record["step"], record["losses"], record["evals"])


# --------------------------------------------------------------------------- processes
def backend_and_device(env: Mapping[str, str]) -> tuple[str, torch.device]:
    """The process group backend and this process's device, from torchrun's environment ``env``.

    NCCL on GPU ``LOCAL_RANK`` only when every process on this machine has a GPU of its own;
    otherwise (no CUDA, or 2 processes on a 1-GPU machine, where rank 1 would ask for a missing
    ``cuda:1``) gloo on the CPU.
    """
    local_rank = int(env.get("LOCAL_RANK", "0"))
    local_world_size = int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", "1")))
    if not torch.cuda.is_available():
        return "gloo", torch.device("cpu")
    if torch.cuda.device_count() >= local_world_size:
        return "nccl", torch.device("cuda", local_rank)
    if local_rank == 0:
        warnings.warn(f"{local_world_size} processes but {torch.cuda.device_count()} GPU(s): training on the CPU (gloo)", stacklevel=2)
    return "gloo", torch.device("cpu")


@dataclass
class Processes:
    """This process's place in a data-parallel group (rank 0 of 1 when not under torchrun)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @classmethod
    def start(cls) -> Processes:
        """Join the process group torchrun describes in the environment (see :func:`backend_and_device`)."""
        if int(os.environ.get("WORLD_SIZE", "1")) == 1:
            return cls()
        backend, device = backend_and_device(os.environ)
        if device.type == "cuda":
            torch.cuda.set_device(device)  # NCCL and plain .cuda() calls use this process's own GPU
        dist.init_process_group(backend)
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global batch (contiguous, equal shares)."""
        if len(batch) % self.world_size:
            raise ValueError(f"batch_size {len(batch)} must be divisible by the number of processes {self.world_size}")
        share = len(batch) // self.world_size
        return batch[self.rank * share : (self.rank + 1) * share].to(self.device)

    def mean(self, value: float) -> float:
        """The mean of ``value`` over all processes (each has an equal share of the batch)."""
        if self.world_size == 1:
            return value
        total = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(total)
        return total.item() / self.world_size

    def wrap(self, module: nn.Module) -> nn.Module:
        """DDP around ``module`` when there are several processes."""
        if self.world_size == 1:
            return module
        return nn.parallel.DistributedDataParallel(module, device_ids=[self.device] if self.device.type == "cuda" else None)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def stop(self) -> None:
        """Leave the process group (every process, after its last collective).

        Exiting Python right after a backward can abort the process: gloo's worker threads may
        still be freeing the backward's all-reduce, which needs the interpreter. The training
        loop's eval, checkpoint and barrier leave them ample time; tests/ddp_gradients.py uses os._exit.
        """
        if self.world_size > 1:
            dist.destroy_process_group()
