"""Long-context extrapolation, measured: a tiny Qwen2 trained at ``L`` tokens, tested up to 16 ``L``.

The model is trained (in a few CPU minutes) on a mix of natural text -- the Python sources shipped
with minqwen, one token per UTF-8 byte as in the tiny training recipe -- and passkey examples: a
five-digit key hidden at a random depth in repeated filler sentences, then the question, then the
key (see :data:`NEEDLE`). Text rows are scored on every token, passkey rows on the five answer digits only (the filler
is trivial to predict and would drown the one thing worth learning); the two means are added.

The same weights are then tested at 1, 2, 4, 8 and 16 times ``L`` with six position schemes,
installed by :meth:`~minqwen.Qwen2ForCausalLM.extend_context` and nothing else:

- ``rope``: plain RoPE, as trained;
- ``linear``: position interpolation, factor = length / L;
- ``dynamic``: dynamic NTK (factor 1: the base grows with length / L);
- ``yarn``: YaRN, factor = length / L, original length L;
- ``dca``: Dual Chunk Attention with the chunk and local sizes chosen by a sweep (see below);
- ``dca_scaled``: the same with Qwen2.5-1M's length scaling of the logits (original length L).

Two measures per (method, length): passkey accuracy (all five digits right under greedy decoding,
checked in one forward pass by teacher forcing) over ``trials`` examples spread evenly over
depths, with a 95 % Wilson interval; and the mean next-token loss on held-out natural text, also
kept by position. The DCA sizes are picked at 8 L on passkey examples drawn with another seed
than the test ones, and for every swept setting the query-key distances DCA shows RoPE are counted
so they can be drawn against the distances training showed (0 .. L-1, distance d seen L-d times
per window).

    python -m minqwen.recipes.extrapolation            # full run, writes notebooks/results/extrapolation.json
    python -m minqwen.recipes.extrapolation --quick    # a small run in about a minute

The trained weights are cached in ``$MINQWEN_CACHE/extrapolation/<hash of the settings>/``
(default ``~/.cache/minqwen``), so a second run only evaluates.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Qwen2Config
from ..dca import DualChunkSettings, dca_position_matrices
from ..loss import lm_loss
from ..model import Qwen2ForCausalLM
from ..hardware import cpu_description
from ..loading import from_pretrained
from ..loading.files import atomic_file, build_directory, cache_dir
from ..loading.weights import save_pretrained
from ..training import cosine_lr, make_optimizer, train_step
from .train_tiny import DEFAULT_TEXT, TextData, byte_vocabulary_config

METHODS = ("rope", "linear", "dynamic", "yarn", "dca", "dca_scaled")
DEFAULT_OUT = Path("notebooks/results/extrapolation.json")
FORMAT_VERSION = 2  # part of the cache key: bump when the data or training code changes its result

# Passkey text, one token per byte. The question ends as the needle does before the key, so the
# answer is a copy. "=" and digits never occur in the filler, and the key's five digits differ, so
# a 2-layer model can copy by the previous token alone (an induction head): the experiment then
# measures positions, not how many tokens of context the tiny model can match.
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key={key}. "
QUESTION = "What is the pass key? The pass key="
KEY_DIGITS = 5


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class ExperimentConfig:
    """Everything the experiment depends on. The training part (see :meth:`training`) keys the cache."""

    # model, trained at trained_length tokens
    trained_length: int = 128
    hidden_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    intermediate_size: int = 384
    rope_theta: float = 10000.0
    # training
    steps: int = 2500
    batch_size: int = 32  # rows per step, text and passkey together
    passkey_fraction: float = 0.5  # share of passkey rows in a batch
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    # evaluation
    multiples: tuple[int, ...] = (1, 2, 4, 8, 16)
    trials: int = 100  # passkey examples per (method, length), spread evenly over the depths
    depths: int = 10  # depth grid 0, 1/(depths-1), ..., 1
    text_windows: int = 8  # held-out text windows per (method, length)
    loss_buckets: int = 32  # position buckets of loss_by_position (at the longest length)
    # DCA sweep at sweep_multiple x L, on sweep_trials examples of another seed than the test
    sweep_multiple: int = 8
    sweep_trials: int = 50
    chunk_fractions: tuple[float, ...] = (1.0, 0.875, 0.75, 0.625, 0.5, 0.25)
    local_fractions: tuple[float, ...] = (0.0625, 0.125)
    threads: int = 1  # a tiny model's matrices are too small to share; on a busy machine 2 threads spin-wait

    def __post_init__(self) -> None:
        if self.trials % self.depths or self.sweep_trials % self.depths:
            raise ValueError(f"trials ({self.trials}) and sweep_trials ({self.sweep_trials}) must be multiples of depths ({self.depths})")
        if passkey_overhead() >= self.trained_length:
            raise ValueError(f"trained_length {self.trained_length} leaves no room for filler: needle and question take {passkey_overhead()} tokens")

    def model_config(self) -> Qwen2Config:
        """The tiny Qwen2: byte vocabulary, tied embeddings, trained context ``trained_length``."""
        return byte_vocabulary_config(self, max_position_embeddings=self.trained_length, rope_theta=self.rope_theta)

    def training(self) -> dict[str, Any]:
        """The settings that determine the trained weights."""
        names = ("trained_length", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "rope_theta", "steps", "batch_size", "passkey_fraction", "lr", "min_lr",
                 "warmup_steps", "weight_decay", "grad_clip", "seed")
        return {name: getattr(self, name) for name in names}


QUICK = dict(trained_length=128, hidden_size=64, num_hidden_layers=2, intermediate_size=192, steps=300,
             multiples=(1, 4, 8), trials=20, depths=5, text_windows=2, loss_buckets=8, sweep_trials=10,
             chunk_fractions=(1.0, 0.75, 0.5), local_fractions=(0.125,))


# --------------------------------------------------------------------------- data
@dataclass
class PasskeyExample:
    """One passkey prompt of exactly ``len(ids)`` byte tokens; the last five are the key's digits."""

    ids: list[int]
    key: str
    needle_start: int  # index of the needle's first token
    depth: float  # needle_start / filler length: 0 = first thing in the prompt, 1 = just before the question

    @property
    def answer_start(self) -> int:
        """Index of the key's first digit (the key ends the prompt)."""
        return len(self.ids) - KEY_DIGITS


def passkey_overhead() -> int:
    """Tokens of a passkey prompt that are not filler: needle, question and answer."""
    return len(NEEDLE.format(key="0" * KEY_DIGITS)) + len(QUESTION) + KEY_DIGITS


def passkey_example(length: int, depth: float, rng: random.Random) -> PasskeyExample:
    """Filler (starting at a random place of its cycle) with the needle at the word start nearest
    ``depth`` of it, then the question and the key (five different digits): ``length`` tokens in all."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be between 0 and 1, got {depth}")
    filler_len = length - passkey_overhead()
    if filler_len < 1:
        raise ValueError(f"length {length} is too short: needle, question and answer take {passkey_overhead()} tokens")
    key = "".join(rng.sample("0123456789", KEY_DIGITS))
    phase = rng.randrange(len(FILLER))
    filler = (FILLER * (2 + (phase + filler_len) // len(FILLER)))[phase : phase + filler_len]
    word_starts = [i for i in range(filler_len + 1) if i in (0, filler_len) or filler[i - 1] == " "]
    start = min(word_starts, key=lambda i: abs(i - depth * filler_len))
    text = filler[:start] + NEEDLE.format(key=key) + filler[start:] + QUESTION + key
    return PasskeyExample(list(text.encode("ascii")), key, start, start / filler_len)


def passkey_examples(length: int, n: int, depths: int, seed: int) -> list[PasskeyExample]:
    """``n`` examples of ``length`` tokens, ``n / depths`` at each depth of the grid 0 .. 1."""
    rng = random.Random(f"passkey/{seed}/{length}")
    grid = [i / (depths - 1) if depths > 1 else 1.0 for i in range(depths)]
    return [passkey_example(length, grid[i % depths], rng) for i in range(n)]


def training_batch(text: TextData, config: ExperimentConfig, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels), each (batch, L): text rows first (every token scored), then passkey
    rows (only the answer digits scored, -100 elsewhere). A function of (seed, step) only."""
    n_passkey = round(config.batch_size * config.passkey_fraction)
    length = config.trained_length
    rows = text.batch("train", config.seed, step, config.batch_size - n_passkey, length)
    rng = random.Random(f"train/{config.seed}/{step}")
    examples = [passkey_example(length, rng.random(), rng) for _ in range(n_passkey)]
    passkey_ids = torch.tensor([e.ids for e in examples], dtype=torch.int64).view(n_passkey, length)
    passkey_labels = torch.full_like(passkey_ids, -100)
    passkey_labels[:, -KEY_DIGITS:] = passkey_ids[:, -KEY_DIGITS:]
    return torch.cat([rows, passkey_ids]), torch.cat([rows, passkey_labels])


# --------------------------------------------------------------------------- training
class MixedLoss(nn.Module):
    """Mean loss of the text rows plus mean loss of the passkey rows (answers only)."""

    def __init__(self, model: Qwen2ForCausalLM, text_rows: int) -> None:
        super().__init__()
        self.model, self.text_rows = model, text_rows

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = self.text_rows
        text = lm_loss(self.model, input_ids[:n], labels[:n]) if n else 0.0
        passkey = lm_loss(self.model, input_ids[n:], labels[n:]) if n < len(input_ids) else 0.0
        return text + passkey


def train_model(config: ExperimentConfig, text: TextData, log_every: int = 100) -> Qwen2ForCausalLM:
    """Train the tiny model from a seeded init; prints the loss every ``log_every`` steps."""
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = Qwen2ForCausalLM(config.model_config())
    optimizer = make_optimizer(model, config)
    loss_fn = MixedLoss(model, config.batch_size - round(config.batch_size * config.passkey_fraction))
    model.train()
    start = time.perf_counter()
    for step in range(config.steps):
        input_ids, labels = training_batch(text, config, step)
        lr = cosine_lr(step, config.steps, config.warmup_steps, config.lr, config.min_lr)
        loss, _ = train_step(loss_fn, optimizer, input_ids, lr, config.grad_clip, labels)
        if (step + 1) % log_every == 0 or step + 1 == config.steps:
            print(f"step {step + 1}/{config.steps}: loss {loss:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return model.eval()


def checkpoint_dir(config: ExperimentConfig, text_sha256: str) -> Path:
    """``<minqwen cache>/extrapolation/<hash>``, the hash of the training settings and the text."""
    key = json.dumps({**config.training(), "text": text_sha256, "format": FORMAT_VERSION}, sort_keys=True)
    return cache_dir() / "extrapolation" / hashlib.sha256(key.encode()).hexdigest()[:16]


def cached_model(config: ExperimentConfig, text: TextData) -> tuple[Qwen2ForCausalLM, bool]:
    """The trained model and whether it came from the cache; a fresh one is built once, under the
    cache's lock, into a temporary directory that is renamed into place when complete."""
    target = checkpoint_dir(config, text.sha256)
    cached = (target / "config.json").is_file()

    def train_and_save(tmp: Path) -> None:
        save_pretrained(train_model(config, text), tmp)
        (tmp / "settings.json").write_text(json.dumps(config.training(), indent=2) + "\n")

    return from_pretrained(build_directory(train_and_save, target)).eval(), cached


# --------------------------------------------------------------------------- methods
@dataclass(frozen=True)
class DcaChoice:
    """DCA's sizes for a run, in tokens."""

    chunk_size: int
    local_size: int


def method_settings(method: str, length: int, trained_length: int, dca: DcaChoice) -> dict[str, Any]:
    """Keyword arguments of ``extend_context`` that test ``method`` at ``length`` tokens."""
    factor = length / trained_length
    longest = max(length, trained_length)
    if method == "rope":
        return {"max_position_embeddings": longest}
    if method == "linear":
        return {"max_position_embeddings": longest, "rope_scaling": {"type": "linear", "factor": factor}}
    if method == "dynamic":  # dynamic NTK reads the trained length from max_position_embeddings (as HF)
        return {"max_position_embeddings": trained_length, "rope_scaling": {"type": "dynamic", "factor": 1.0}}
    if method == "yarn":
        return {"max_position_embeddings": longest,
                "rope_scaling": {"type": "yarn", "factor": factor, "original_max_position_embeddings": trained_length}}
    if method in ("dca", "dca_scaled"):
        dual = {"chunk_size": dca.chunk_size, "local_size": dca.local_size}
        if method == "dca_scaled":
            dual["original_max_position_embeddings"] = trained_length
        return {"max_position_embeddings": longest, "dual_chunk_attention_config": dual}
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


# --------------------------------------------------------------------------- measures
def batch_rows(length: int) -> int:
    """Sequences per forward at ``length`` tokens: about 2**24 attention scores per head."""
    return max(1, min(64, 2**24 // length**2))


@torch.no_grad()
def passkey_hits(model: Qwen2ForCausalLM, examples: Sequence[PasskeyExample]) -> list[bool]:
    """Whether greedy decoding would reproduce each key: the argmax after the question and after
    each correct digit is the next digit (one forward per example, batched)."""
    hits = []
    rows = batch_rows(len(examples[0].ids))
    for first in range(0, len(examples), rows):
        group = examples[first : first + rows]
        ids = torch.tensor([e.ids for e in group], dtype=torch.int64)  # (batch, length)
        hidden = model.model(ids)[:, -KEY_DIGITS - 1 : -1]  # (batch, 5, hidden): the positions that predict the key
        predicted = model.lm_head(hidden).argmax(-1)  # (batch, 5)
        hits += (predicted == ids[:, -KEY_DIGITS:]).all(-1).tolist()
    return hits


@torch.no_grad()
def position_losses(model: Qwen2ForCausalLM, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss at each position (length - 1,) over text windows (n, length)."""
    total = torch.zeros(windows.shape[1] - 1)
    rows = batch_rows(windows.shape[1])
    for first in range(0, len(windows), rows):
        ids = windows[first : first + rows]
        logits = model(ids)[:, :-1].float()  # (batch, length - 1, vocab)
        total += F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none").sum(0)
    return total / len(windows)


def bucket_losses(losses: torch.Tensor, buckets: int) -> list[list[float]]:
    """[[first position of the bucket, mean loss], ...]: the per-position curve in ``buckets`` pieces."""
    edges = torch.linspace(0, len(losses), buckets + 1).round().long().tolist()
    return [[lo + 1, round(losses[lo:hi].mean().item(), 4)] for lo, hi in zip(edges, edges[1:]) if hi > lo]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> list[float]:
    """95 % Wilson score interval of a binomial proportion (sound at 0 and 1, unlike p +- 2 se)."""
    if n == 0:
        raise ValueError("a proportion of 0 trials has no interval")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def by_depth(examples: Sequence[PasskeyExample], hits: Sequence[bool], depths: int) -> list[float]:
    """Accuracy at each depth of the grid (examples are laid out depth-major as :func:`passkey_examples` does)."""
    return [round(sum(hits[d::depths]) / len(hits[d::depths]), 4) for d in range(depths)]


def dca_distances(dca: DcaChoice, length: int, trained_length: int) -> dict[str, Any]:
    """The query-key distances DCA hands RoPE in a causal ``length``-token sequence, against training.

    Returns the largest distance, the count of each distance 0..chunk_size over all visible pairs
    (training's window shows distance d ``trained_length - d`` times), the share of pairs at
    distances training saw rarely (the top eighth, >= 7/8 L) or never (>= L), and the distance at
    which the last query sees every key of the far (inter-chunk) part.
    """
    settings = DualChunkSettings(dca.chunk_size, dca.local_size)
    positions = torch.arange(length)
    query_pos, key_pos, part, visible = dca_position_matrices(positions, positions, settings)
    distance = (query_pos - key_pos)[visible]  # (pairs,)
    counts = torch.bincount(distance, minlength=dca.chunk_size + 1).tolist()
    far = (query_pos - key_pos)[-1][part[-1] == 2]  # the last query's inter-chunk keys
    rare = math.ceil(0.875 * trained_length)
    return {
        "chunk_size": dca.chunk_size,
        "local_size": dca.local_size,
        "length": length,
        "max_distance": int(distance.max()),
        "counts": counts,
        "share_at_or_beyond_7_8_L": round(float((distance >= rare).float().mean()), 4),
        "share_at_or_beyond_L": round(float((distance >= trained_length).float().mean()), 4),
        "last_query_inter_range": [int(far.min()), int(far.max())] if far.numel() else None,
    }


def training_distances(trained_length: int) -> list[int]:
    """How often each distance 0..L-1 occurs among the query-key pairs of one training window."""
    return [trained_length - d for d in range(trained_length)]


# --------------------------------------------------------------------------- the experiment
def evaluate_method(model: Qwen2ForCausalLM, method: str, length: int, config: ExperimentConfig,
                    dca: DcaChoice, examples: Sequence[PasskeyExample], windows: torch.Tensor | None) -> dict[str, Any]:
    """Passkey hits and text losses of one (method, length) cell; the model is switched and restored."""
    model.extend_context(**method_settings(method, length, config.trained_length, dca))
    try:
        hits = passkey_hits(model, examples)
        losses = position_losses(model, windows) if windows is not None else None
    finally:
        model.extend_context(config.trained_length)
    return {"hits": hits, "losses": losses}


def sweep_dca(model: Qwen2ForCausalLM, config: ExperimentConfig) -> tuple[DcaChoice, list[dict[str, Any]]]:
    """Passkey accuracy at ``sweep_multiple`` x L for every (chunk, local, scaling) of the sweep, on
    examples of another seed than the test's. Picks the (chunk, local) with the best accuracy
    summed over both scalings; ties go to the larger chunk (fewer relabelled distances)."""
    L = config.trained_length
    length = config.sweep_multiple * L
    examples = passkey_examples(length, config.sweep_trials, config.depths, seed=config.seed + 1_000)
    rows = []
    for chunk_fraction in config.chunk_fractions:
        for local_fraction in config.local_fractions:
            dca = DcaChoice(round(chunk_fraction * L), max(1, round(local_fraction * L)))
            if dca.local_size >= dca.chunk_size:
                continue
            row = {"chunk_size": dca.chunk_size, "local_size": dca.local_size, "length": length}
            for method in ("dca", "dca_scaled"):
                hits = evaluate_method(model, method, length, config, dca, examples, None)["hits"]
                row[method] = round(sum(hits) / len(hits), 4)
            row["distances"] = dca_distances(dca, length, L)
            print(f"sweep chunk {dca.chunk_size} local {dca.local_size}: dca {row['dca']:.2f} "
                  f"dca_scaled {row['dca_scaled']:.2f} (max distance {row['distances']['max_distance']})", flush=True)
            rows.append(row)
    best = max(rows, key=lambda r: (r["dca"] + r["dca_scaled"], r["chunk_size"], -r["local_size"]))
    return DcaChoice(best["chunk_size"], best["local_size"]), rows


def run_experiment(config: ExperimentConfig) -> dict[str, Any]:
    """Train (or load) the model, sweep DCA, evaluate every cell; returns the results dict."""
    torch.set_num_threads(config.threads)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    L = config.trained_length
    lengths = [m * L for m in config.multiples]
    text = TextData.from_file(DEFAULT_TEXT, max(lengths), 0.1)
    model, cached = cached_model(config, text)
    dca, sweep = sweep_dca(model, config)
    print(f"DCA chosen: chunk {dca.chunk_size}, local {dca.local_size}", flush=True)
    rows, depth_accuracy, position_curves = [], {m: {} for m in METHODS}, {}
    for length in lengths:
        examples = passkey_examples(length, config.trials, config.depths, seed=config.seed)
        windows = torch.cat([text.batch("val", config.seed, -1 - i, 1, length) for i in range(config.text_windows)])
        for method in METHODS:
            cell = evaluate_method(model, method, length, config, dca, examples, windows)
            hits, losses = cell["hits"], cell["losses"]
            accuracy = sum(hits) / len(hits)
            rows.append({"method": method, "length": length, "passkey_accuracy": round(accuracy, 4),
                         "passkey_ci95": wilson_interval(sum(hits), len(hits)), "loss": round(losses.mean().item(), 4)})
            depth_accuracy[method][str(length)] = by_depth(examples, hits, config.depths)
            if length == max(lengths):
                position_curves[method] = bucket_losses(losses, config.loss_buckets)
            print(f"{method:>10} {length:>5}: passkey {accuracy:.2f}  loss {rows[-1]['loss']:.3f}", flush=True)
    chosen = next(r for r in sweep if (r["chunk_size"], r["local_size"]) == (dca.chunk_size, dca.local_size))
    return {
        "trained_length": L,
        "model": config.model_config().to_dict(),
        "trials": config.trials,
        "seed": config.seed,
        "rows": rows,
        "loss_by_position": position_curves,
        "loss_by_position_length": max(lengths),
        "by_depth": {"depths": [i / (config.depths - 1) for i in range(config.depths)], "accuracy": depth_accuracy},
        "dca_settings": {"chunk_size": dca.chunk_size, "local_size": dca.local_size,
                         "length_scaling_original_max_position_embeddings": L,
                         "chosen_by": f"best dca + dca_scaled passkey accuracy at {config.sweep_multiple} x L "
                                      f"over {config.sweep_trials} examples of a different seed than the test",
                         "distances_at_sweep_length": chosen["distances"]},
        "chunk_sweep": sweep,
        "training_distance_counts": training_distances(L),
        "methods": {m: method_settings(m, 4 * L, L, dca) for m in METHODS},
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()},
        "checkpoint_from_cache": cached,
        "date": datetime.date.today().isoformat(),
        "machine": cpu_description(),
        "torch": torch.__version__,
        "threads": config.threads,
        "cpu_seconds": round(time.process_time() - cpu_start, 1),
        "wall_seconds": round(time.perf_counter() - wall_start, 1),
    }


def write_json(results: dict[str, Any], path: Path) -> None:
    """Write ``results`` to ``path`` atomically: a reader never sees half a file."""
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


def format_table(results: dict[str, Any]) -> str:
    """Passkey accuracy and text loss, one line per method, one column per length."""
    lengths = sorted({r["length"] for r in results["rows"]})
    cells = {(r["method"], r["length"]): r for r in results["rows"]}
    head = f"{'method':>10} " + " ".join(f"{n:>13}" for n in lengths)
    lines = [f"passkey accuracy / text loss, trained at L = {results['trained_length']}", head]
    for method in METHODS:
        lines.append(f"{method:>10} " + " ".join(
            f"{cells[method, n]['passkey_accuracy']:>6.2f} /{cells[method, n]['loss']:>5.2f}" for n in lengths))
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m minqwen.recipes.extrapolation", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model and few trials: about a minute")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results JSON (default {DEFAULT_OUT})")
    parser.add_argument("--steps", type=int, default=None, help="training steps (override)")
    parser.add_argument("--trials", type=int, default=None, help="passkey trials per cell (override; a multiple of the depths)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default 1)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the weights, the batches and the test examples")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {k: v for k, v in (("steps", args.steps), ("trials", args.trials), ("threads", args.threads), ("seed", args.seed)) if v is not None}
    config = ExperimentConfig(**{**(QUICK if args.quick else {}), **overrides})
    results = run_experiment(config)
    write_json(results, args.out)
    print(format_table(results))
    print(f"DCA: chunk {results['dca_settings']['chunk_size']}, local {results['dca_settings']['local_size']}; "
          f"{results['cpu_seconds']:.0f} CPU s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
