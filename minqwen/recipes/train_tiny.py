"""Recipe: train a Qwen2 from scratch -- a tiny model on a small text, on a laptop CPU, in minutes.

The loop is the classic one (as in nanoGPT), made of :mod:`minqwen.training`'s pieces: draw a
batch of text windows, compute the next-token loss, backpropagate, clip the gradient norm, take
an AdamW step with a learning rate that warms up linearly and then decays along a cosine. Every
``eval_every`` steps we measure the loss on held-out text and print a sample; every
``checkpoint_every`` steps we write a checkpoint.

Resuming is exact: the batch of step ``s`` is a function of ``(seed, s)`` only, so a checkpoint
needs nothing random -- just the weights, the AdamW moments and the step. A run that is killed
and started again with the same command continues from its last checkpoint and produces the
same losses as a run that was never interrupted.

Data parallel: started under ``torchrun --nproc_per_node N``, each process takes 1/N of every
batch and DDP averages the gradients (:class:`~minqwen.training.Processes`), so N processes take
the same steps as one process with the whole batch. Only rank 0 logs and writes.

The tokens are UTF-8 bytes (vocabulary 256): nothing to train first, any text encodes, and the
loss is in nats per byte. Checkpoints are HF-format directories (``config.json``,
``model.safetensors``, ``tokenizer.json``) that :func:`minqwen.from_pretrained`,
:class:`minqwen.Tokenizer` and HF transformers all load.

    python -m minqwen train --out-dir runs/tiny
    torchrun --standalone --nproc_per_node 2 -m minqwen train --out-dir runs/tiny-ddp
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from ..bpe import byte_level_tokenizer_json, bytes_to_unicode
from ..config import Qwen2Config
from ..generate import generate
from ..loss import lm_loss
from ..model import Qwen2ForCausalLM
from ..tokenizer import Tokenizer
from ..training import (
    CausalLMLoss,
    Processes,
    TrainState,
    checkpoint_dirs,
    cosine_lr,
    load_checkpoint,
    make_optimizer,
    remove_partial_checkpoints,
    save_checkpoint,
    train_step,
)
from . import add_dataclass_arguments, dataclass_from_args

DEFAULT_TEXT = Path(__file__).parents[1] / "data" / "python_stdlib.txt"


# --------------------------------------------------------------------------- settings
def _setting(default: Any, help: str, resumable: bool = False) -> Any:
    """A TrainConfig field; ``resumable`` ones may differ when a run is resumed."""
    return field(default=default, metadata={"help": help, "resumable": resumable})


def byte_vocabulary_config(sizes: Any, **overrides: Any) -> Qwen2Config:
    """A small Qwen2 over the 256 byte values with tied embeddings (as small Qwen2s have).

    ``sizes`` is any settings object with ``hidden_size``, ``intermediate_size``,
    ``num_hidden_layers``, ``num_attention_heads`` and ``num_key_value_heads`` (this recipe's
    :class:`TrainConfig`, the extrapolation experiment's); ``overrides`` sets other config fields.
    """
    names = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
    return Qwen2Config(vocab_size=256, tie_word_embeddings=True, **{name: getattr(sizes, name) for name in names}, **overrides)


@dataclass
class TrainConfig:
    """Everything a training run depends on; each field is also a command-line flag."""

    # data
    text: str = _setting(str(DEFAULT_TEXT), "UTF-8 text file to train on (default: Python stdlib sources shipped with minqwen)", resumable=True)
    val_fraction: float = _setting(0.1, "fraction of the text, at its end, held out for evaluation")
    seq_len: int = _setting(128, "tokens (bytes) per training window")
    batch_size: int = _setting(8, "windows per step, summed over all processes")
    # model: Qwen2Config fields (vocab_size is 256, one token per byte)
    hidden_size: int = _setting(96, "model width")
    num_hidden_layers: int = _setting(3, "decoder blocks")
    num_attention_heads: int = _setting(4, "query heads")
    num_key_value_heads: int = _setting(2, "key/value heads (GQA)")
    intermediate_size: int = _setting(256, "SwiGLU hidden width")
    # optimisation
    steps: int = _setting(1200, "optimizer steps in the whole run")
    lr: float = _setting(3e-3, "peak learning rate")
    min_lr: float = _setting(3e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = _setting(100, "steps of linear warm-up from 0 to lr")
    weight_decay: float = _setting(0.1, "AdamW weight decay of matrices (biases and norms get none)")
    grad_clip: float = _setting(1.0, "clip the global gradient norm to this")
    seed: int = _setting(0, "seed of the initial weights and of every batch")
    # bookkeeping: free to change when resuming
    out_dir: str = _setting("runs/tiny", "where checkpoints go; a run resumes from the latest one found here", resumable=True)
    log_every: int = _setting(10, "print the training loss every N steps", resumable=True)
    eval_every: int = _setting(200, "evaluate and print a sample every N steps", resumable=True)
    eval_batches: int = _setting(8, "batches of held-out text per evaluation", resumable=True)
    checkpoint_every: int = _setting(200, "write a checkpoint every N steps (and at the end)", resumable=True)
    keep_checkpoints: int = _setting(2, "how many recent checkpoints to keep", resumable=True)
    sample_prompt: str = _setting("def ", "text the printed samples start from", resumable=True)
    sample_tokens: int = _setting(120, "bytes per printed sample (at most the context that is left)", resumable=True)
    threads: int = _setting(1, "torch threads per process; a tiny model's matrices are too small to share, so use more processes (torchrun) for more cores; 0: PyTorch's default", resumable=True)

    def __post_init__(self) -> None:
        positive = ("seq_len", "batch_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "intermediate_size", "steps", "log_every", "eval_every",
                    "eval_batches", "checkpoint_every", "keep_checkpoints")
        bad = [f"{name}={getattr(self, name)!r}" for name in positive if getattr(self, name) < 1]
        if bad:
            raise ValueError(f"these settings must be >= 1: {', '.join(bad)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"need 0 < min_lr <= lr, got min_lr={self.min_lr}, lr={self.lr}")

    def model_config(self) -> Qwen2Config:
        """The Qwen2 this run trains: byte vocabulary, tied embeddings (as small Qwen2s have)."""
        return byte_vocabulary_config(self, max_position_embeddings=self.seq_len)

    def trajectory(self) -> dict[str, Any]:
        """The settings that determine the losses (all but the resumable ones)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.metadata["resumable"]}


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of ``step`` in a run with these settings (see :func:`cosine_lr`)."""
    return cosine_lr(step, config.steps, config.warmup_steps, config.lr, config.min_lr)


# --------------------------------------------------------------------------- tokens and data
def byte_tokenizer_json() -> dict[str, Any]:
    """An HF ``tokenizer.json`` whose tokens are the 256 bytes (byte-level BPE with no merges).

    Token id = byte value. Qwen2's pre-tokenizer is kept so the file has Qwen2's shape; with no
    merges it changes nothing.
    """
    return byte_level_tokenizer_json({symbol: byte for byte, symbol in bytes_to_unicode().items()}, [], nfc=False)


def byte_tokenizer() -> Tokenizer:
    """The tokenizer of every model this recipe trains: UTF-8 bytes are the tokens."""
    return Tokenizer.from_tokenizer_json(byte_tokenizer_json())


@dataclass
class TextData:
    """A text as token ids, split into a training part and a held-out part at its end."""

    train: torch.Tensor  # (n_train,) int64
    val: torch.Tensor  # (n_val,) int64
    sha256: str  # of the text file, so a resumed run can check it trains on the same text

    @classmethod
    def from_file(cls, path: str | os.PathLike, seq_len: int, val_fraction: float) -> TextData:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"training text {path} not found")
        raw = path.read_bytes()
        try:
            ids = torch.tensor(byte_tokenizer().encode(raw.decode("utf-8")), dtype=torch.int64)
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} is not UTF-8 text ({e})") from None
        split = int(len(ids) * (1 - val_fraction))
        if min(split, len(ids) - split) <= seq_len:
            raise ValueError(f"{path}: {len(ids)} tokens is too short for seq_len={seq_len} with val_fraction={val_fraction}")
        return cls(ids[:split], ids[split:], hashlib.sha256(raw).hexdigest())

    def batch(self, split: str, seed: int, index: int, batch_size: int, seq_len: int) -> torch.Tensor:
        """Windows (batch_size, seq_len) at random places, a function of (split, seed, index) only."""
        ids = self.train if split == "train" else self.val
        generator = torch.Generator().manual_seed(seed * 1_000_003 + index * 2 + (split != "train"))
        starts = torch.randint(0, len(ids) - seq_len + 1, (batch_size,), generator=generator)
        return torch.stack([ids[s : s + seq_len] for s in starts.tolist()])


# --------------------------------------------------------------------------- model, evaluation, samples
def new_model(config: TrainConfig) -> Qwen2ForCausalLM:
    """A freshly initialised model (HF's init), the same for every process given the seed."""
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        return Qwen2ForCausalLM(config.model_config())


@torch.no_grad()
def evaluate_loss(model: Qwen2ForCausalLM, data: TextData, config: TrainConfig, split: str = "val") -> float:
    """Mean loss over ``eval_batches`` fixed batches of a split (the same batches every time)."""
    was_training = model.training
    model.eval()
    losses = [
        lm_loss(model, data.batch(split, config.seed, -1 - i, config.batch_size, config.seq_len)).item()
        for i in range(config.eval_batches)
    ]
    model.train(was_training)
    return sum(losses) / len(losses)


def sample(model: Qwen2ForCausalLM, prompt: str, max_new_tokens: int, seed: int = 0, temperature: float = 0.8) -> str:
    """The prompt and a sampled continuation, as text (undecodable bytes become U+FFFD).

    The continuation stops where the context the model was trained on ends.
    """
    tokenizer = byte_tokenizer()
    ids = tokenizer.encode(prompt)
    max_new_tokens = min(max_new_tokens, model.config.max_position_embeddings - len(ids))
    new = generate(model, ids, max_new_tokens, temperature=temperature, top_k=40, seed=seed, stop_token_ids=[])
    return tokenizer.decode(ids + new)


# --------------------------------------------------------------------------- checkpoints
def write_checkpoint(model: Qwen2ForCausalLM, optimizer: torch.optim.Optimizer, state: TrainState,
                     config: TrainConfig, data_sha256: str) -> Path:
    """A checkpoint of this run (with its byte tokenizer) that a resume can check against."""
    record = {"train_config": dataclasses.asdict(config), "text_sha256": data_sha256}
    tokenizer_file = {"tokenizer.json": json.dumps(byte_tokenizer_json(), ensure_ascii=False)}
    return save_checkpoint(config.out_dir, model, optimizer, state, record, config.keep_checkpoints, tokenizer_file)


def check_resumable(path: Path, record: dict[str, Any], config: TrainConfig, data_sha256: str) -> None:
    """A ``ValueError`` naming every setting that differs from the run that wrote ``path``."""
    saved = TrainConfig(**record["train_config"]).trajectory()
    differences = [f"{k}: checkpoint {saved[k]!r}, now {v!r}" for k, v in config.trajectory().items() if saved[k] != v]
    if record["text_sha256"] != data_sha256:
        differences.append("text: the training text is not the one the checkpoint was trained on")
    if differences:
        raise ValueError(
            f"cannot resume from {path}: it belongs to a run with other settings ({'; '.join(differences)}). "
            "Use the same settings, or another --out-dir to start a new run."
        )


# --------------------------------------------------------------------------- the loop
def train(config: TrainConfig) -> TrainState:
    """Run (or resume) training as configured; returns the final state on every process."""
    procs = Processes.start()
    try:
        return _train(config, procs)
    finally:
        procs.stop()


def _train(config: TrainConfig, procs: Processes) -> TrainState:
    if config.threads:
        torch.set_num_threads(config.threads)
    log = print if procs.is_main else (lambda *args, **kwargs: None)
    data = TextData.from_file(config.text, config.seq_len, config.val_fraction)
    model = new_model(config).to(procs.device).train()
    optimizer = make_optimizer(model, config)
    state = TrainState()
    if procs.is_main:
        remove_partial_checkpoints(config.out_dir)
    if checkpoints := checkpoint_dirs(config.out_dir):
        check = lambda record: check_resumable(checkpoints[-1], record, config, data.sha256)  # noqa: E731
        state = load_checkpoint(checkpoints[-1], model, optimizer, check)
        log(f"resumed from {checkpoints[-1]} at step {state.step}", flush=True)
    else:
        log(f"training {model.num_parameters():,} parameters on {len(data.train):,} bytes "
            f"({procs.world_size} process{'es' if procs.world_size > 1 else ''})", flush=True)
    loss_fn = procs.wrap(CausalLMLoss(model))
    started, tokens = time.perf_counter(), 0
    for step in range(state.step, config.steps):
        batch = data.batch("train", config.seed, step, config.batch_size, config.seq_len)
        loss, grad_norm = train_step(loss_fn, optimizer, procs.shard(batch), lr_at(step, config), config.grad_clip)
        state.losses.append(procs.mean(loss))
        state.step, tokens = step + 1, tokens + batch.numel()
        if state.step % config.log_every == 0:
            rate = tokens / (time.perf_counter() - started)
            log(f"step {state.step:6d}/{config.steps} | loss {state.losses[-1]:.4f} | lr {lr_at(step, config):.2e} "
                f"| grad norm {grad_norm:.2f} | {rate:,.0f} tok/s", flush=True)
        last = state.step == config.steps
        if procs.is_main and (state.step % config.eval_every == 0 or last):
            state.evals.append(_evaluate_and_sample(model, data, config, state.step, log))
        if procs.is_main and (state.step % config.checkpoint_every == 0 or last):
            path = write_checkpoint(model, optimizer, state, config, data.sha256)
            log(f"checkpoint step {state.step} -> {path}", flush=True)
        procs.barrier()
    return state


def _evaluate_and_sample(model: Qwen2ForCausalLM, data: TextData, config: TrainConfig, step: int, log) -> dict[str, float]:
    record = {"step": step, "train": evaluate_loss(model, data, config, "train"), "val": evaluate_loss(model, data, config, "val")}
    log(f"eval step {step} | train loss {record['train']:.4f} | val loss {record['val']:.4f}", flush=True)
    model.eval()
    log("sample: " + sample(model, config.sample_prompt, config.sample_tokens, seed=step), flush=True)
    model.train()
    return record


# --------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field (``--out-dir``, ``--steps`` ...)."""
    add_dataclass_arguments(parser, TrainConfig)


def run(args: argparse.Namespace) -> int:
    """``python -m minqwen train``: train, print where the checkpoints are."""
    train(dataclass_from_args(TrainConfig, args))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minqwen train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
