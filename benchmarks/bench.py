"""Benchmark minqwen against Hugging Face transformers and llama.cpp on the real checkpoint, in one run.

    python -m benchmarks.bench                  # from the repository root (= make bench; about half an hour on 2 cores)
    python -m benchmarks.bench --quick          # a smoke run: one repeat, prefill 128 only
    python -m benchmarks.bench --configs minqwen-bfloat16,hf-bfloat16 --repeats 5
    python -m benchmarks.bench tokenizer [...]  # the tokenizer benchmark (benchmarks/tokenizer_bench.py)

Each configuration (engine x dtype, plus minqwen int8 / int4 and llama.cpp on the GGUF itself)
runs in a fresh Python process, so load
time and peak memory are what a user would see, and the repeats of all configurations are
interleaved, so a noisy neighbour slows every configuration alike. A worker measures, on the same
fixed token ids for both engines:

- load time: ``from_pretrained`` from the warm cache (imports not counted), and the first token
  after it (which also pays for reading memory-mapped weights from the page cache);
- decode: tokens/s of a greedy 128-token continuation of a 32-token prompt, after a warm-up;
- prefill: tokens/s of processing 128 / 1024 / 4096 prompt tokens up to the first new token;
- peak RSS through load + decode, and through everything;
- agreement: how many of the greedy tokens match minqwen's fp32 greedy tokens for the same
  prompt, from the first (llama.cpp quantises its activations too, so its text may drift).

llama.cpp (``llama-cpp-python``, pinned in ``benchmarks/requirements-bench.txt``; ``make bench``
installs it, a ~7-minute build from source on 2 cores) runs the very GGUF file the checkpoint
comes from, with the same thread count and prompt token ids. Without it the ``llamacpp-gguf``
row reports that it is not installed and the others run.

Decoding one token reads every weight except the embedding table once, so memory bandwidth sets
a ceiling: ``bandwidth / bytes per token``. The benchmark measures the bandwidth too and prints
that bound next to each decode figure. The table reports medians over the repeats with the ratio
minqwen / HF, checks the targets of the performance issue, and the JSON (written outside the
repository by default, under ``bench-results/``) keeps every sample plus the CPU's flags and
``torch.backends.cpu.get_cpu_capability()`` -- bf16 speed depends on them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from minqwen.chat import common_prefix_length
from minqwen.hardware import cpu_description, measure_bandwidth, peak_rss_mb
from minqwen.loading.files import atomic_file

ENGINES = ("minqwen", "hf", "llamacpp")
DTYPES = ("float32", "bfloat16")
SCHEMES = ("int8", "int4")  # minqwen's weight-only quantisations, with bf16 activations
LLAMACPP_CONFIG = "llamacpp-gguf"  # llama.cpp on the GGUF file as stored (Q4_K_M for the default checkpoint)
CONFIGS = ("hf-float32", "minqwen-float32", "hf-bfloat16", "minqwen-bfloat16", "minqwen-int8", "minqwen-int4", LLAMACPP_CONFIG)
REFERENCE_CONFIG = "minqwen-float32"  # whose greedy tokens the others are compared with
# The configuration `python -m minqwen` uses on a CPU: int8 weights through the integer dot-product kernel.
DEFAULT_FAST_CONFIG = "minqwen-int8"
RESULT_MARKER = "BENCH_RESULT "
PROMPT_SEED = 1234
TEXT_TOKEN_LIMIT = 151643  # ids below this are ordinary text pieces in Qwen2's vocabulary
REPOSITORY = Path(__file__).resolve().parents[1]  # holds benchmarks/ (and minqwen/)


# --------------------------------------------------------------------------- what to run
@dataclass(frozen=True)
class Settings:
    """What every configuration is asked to do; the same for all of them in one run."""

    checkpoint: str = "qwen2.5-coder-0.5b-instruct"
    prompt_tokens: int = 32
    new_tokens: int = 128
    prefill_lengths: tuple[int, ...] = (128, 1024, 4096)
    repeats: int = 3
    long_prefill: int = 4096  # prefill lengths >= this run in the first repeat only (minutes each with HF bf16)
    threads: int | None = None  # torch intra-op threads; None keeps torch's default (one per core)


@dataclass(frozen=True)
class RunConfig:
    """One row of the table: an engine, a dtype, and optionally minqwen's int8 / int4 weights."""

    engine: str
    dtype: str
    quantize: str | None = None

    @property
    def name(self) -> str:
        return f"{self.engine}-{self.quantize or self.dtype}"

    @staticmethod
    def parse(name: str) -> RunConfig:
        """``"minqwen-bfloat16"``, ``"hf-float32"``, ``"minqwen-int4"`` (int4 weights, bf16 activations), ``"llamacpp-gguf"``."""
        if name not in CONFIGS:
            raise ValueError(f"unknown configuration {name!r}; known: {', '.join(CONFIGS)}")
        engine, _, kind = name.partition("-")
        return RunConfig(engine, "bfloat16", kind) if kind in (*SCHEMES, "gguf") else RunConfig(engine, kind)


# --------------------------------------------------------------------------- the machine
def machine_info() -> dict[str, Any]:
    """Everything needed to compare two runs: CPU, memory, OS and library versions."""
    from minqwen import qdot

    info = {"cpu": cpu_description(), "python": platform.python_version(), "os": platform.platform(), "torch": torch.__version__}
    info["qdot_kernel"] = qdot.cpu_isa() if qdot.kernel() is not None else None  # the int8/int4 decode kernel's build
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        total_kb = int(meminfo.read_text().split("MemTotal:")[1].split()[0])
        info["memory_gb"] = round(total_kb / 2**20, 1)
    return info


# --------------------------------------------------------------------------- the two engines
def prompt_ids(length: int, vocab_size: int = TEXT_TOKEN_LIMIT, seed: int = PROMPT_SEED) -> list[int]:
    """Fixed pseudo-random text-token ids, identical for both engines (speed ignores content)."""
    generator = torch.Generator().manual_seed(seed + length)
    return torch.randint(0, min(vocab_size, TEXT_TOKEN_LIMIT), (length,), generator=generator).tolist()


class MinqwenRunner:
    """Loads and runs a model with minqwen's own ``from_pretrained`` and generation loop."""

    def __init__(self, config: RunConfig, checkpoint: str) -> None:
        import minqwen

        self.minqwen, self.config, self.checkpoint = minqwen, config, checkpoint
        self.model = None

    def load(self) -> None:
        quantize = {"quantize": self.config.quantize} if self.config.quantize else {}
        self.model = self.minqwen.from_pretrained(self.checkpoint, dtype=self.config.dtype, **quantize)

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def generate(self, prompt: list[int], new_tokens: int) -> tuple[list[float], list[int]]:
        """Greedy decoding that never stops early; returns the time each new token appeared, and the tokens."""
        from minqwen.generate import generate_steps

        stamps, tokens = [], []
        for step in generate_steps(self.model, [prompt], new_tokens, stop_token_ids=[]):
            stamps.append(time.perf_counter())
            tokens.append(step.token_ids[0])
        return stamps, tokens


class HFRunner:
    """transformers' ``Qwen2ForCausalLM`` on the same weights (the HF-format directory minqwen made)."""

    def __init__(self, config: RunConfig, checkpoint: str) -> None:
        import transformers

        from minqwen.hub import resolve

        self.transformers, self.config = transformers, config
        self.directory = resolve(checkpoint)
        self.model = None

    def load(self) -> None:
        dtype = getattr(torch, self.config.dtype)
        self.model = self.transformers.Qwen2ForCausalLM.from_pretrained(self.directory, dtype=dtype).eval()

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def generate(self, prompt: list[int], new_tokens: int) -> tuple[list[float], list[int]]:
        """HF's ``generate`` (greedy, exactly ``new_tokens``); a streamer stamps each new token."""
        stamps: list[float] = []
        tokens: list[int] = []

        class Stamps(self.transformers.generation.streamers.BaseStreamer):
            def put(self, value: torch.Tensor) -> None:  # the first call carries the prompt
                stamps.append(time.perf_counter())
                tokens.extend(value.flatten().tolist())

            def end(self) -> None:
                pass

        ids = torch.tensor([prompt])
        self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            streamer=Stamps(),
            pad_token_id=0,
        )
        return stamps[1:], tokens[len(prompt) :]


def gguf_file(checkpoint: str) -> Path:
    """The GGUF file behind ``checkpoint``: a ``.gguf`` path, or a known name's cached (verified) file."""
    from minqwen.loading import hub

    path = Path(checkpoint).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    if checkpoint in hub.CHECKPOINTS:
        return hub.verified_gguf(hub.CHECKPOINTS[checkpoint])
    raise ValueError(f"llama.cpp runs GGUF files: {checkpoint!r} is neither a .gguf file nor a known name ({', '.join(hub.CHECKPOINTS)})")


def llamacpp_missing() -> str | None:
    """Why the llama.cpp configuration cannot run here (``llama_cpp`` not importable), or None."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python is not installed ({e}); `pip install -r benchmarks/requirements-bench.txt` (or `make bench`) builds it"
    return None


class LlamaCppRunner:
    """llama.cpp (through ``llama-cpp-python``) on the checkpoint's own GGUF file, greedy, on the CPU."""

    def __init__(self, config: RunConfig, checkpoint: str, threads: int | None = None, context: int = 4096) -> None:
        missing = llamacpp_missing()
        if missing:
            raise RuntimeError(missing)
        import llama_cpp

        self.llama_cpp, self.config = llama_cpp, config
        self.path = gguf_file(checkpoint)  # verified here, outside the timed load
        self.threads = threads or torch.get_num_threads()  # the same count torch uses in the other rows
        self.context = context
        self.model = None

    def load(self) -> None:
        self.model = self.llama_cpp.Llama(
            model_path=str(self.path), n_ctx=self.context, n_batch=512, n_threads=self.threads, n_threads_batch=self.threads, verbose=False
        )

    @property
    def vocab_size(self) -> int:
        return self.model.n_vocab()

    def generate(self, prompt: list[int], new_tokens: int) -> tuple[list[float], list[int]]:
        """Greedy (``temp=0``) from an empty context: ``reset`` so no earlier prompt's cache is reused."""
        self.model.reset()
        stamps, tokens = [], []
        for token in self.model.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            stamps.append(time.perf_counter())
            tokens.append(int(token))
            if len(tokens) == new_tokens:
                break
        return stamps, tokens


RUNNERS: dict[str, Callable[..., Any]] = {"minqwen": MinqwenRunner, "hf": HFRunner, "llamacpp": LlamaCppRunner}


def make_runner(config: RunConfig, settings: Settings) -> Any:
    """The engine's runner; llama.cpp also gets the thread count and a context that fits every prompt."""
    if config.engine != "llamacpp":
        return RUNNERS[config.engine](config, settings.checkpoint)
    context = max(*settings.prefill_lengths, settings.prompt_tokens + settings.new_tokens) + 16
    return LlamaCppRunner(config, settings.checkpoint, settings.threads, context)


def agreement(tokens: list[int], reference: list[int]) -> int:
    """How many tokens, from the first, ``tokens`` and ``reference`` share (greedy texts agree until they don't)."""
    return common_prefix_length(tokens, reference)


def bytes_per_token(model: torch.nn.Module) -> int:
    """Bytes of weights one decoding step reads: every tensor once, except an untied embedding table."""
    embedding = model.get_input_embeddings().weight if hasattr(model, "get_input_embeddings") else model.model.embed_tokens.weight
    head = model.lm_head.weight if hasattr(model.lm_head, "weight") else None
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        pointer = tensor.data_ptr()
        if pointer in seen or (pointer == embedding.data_ptr() and (head is None or head.data_ptr() != pointer)):
            continue
        seen.add(pointer)
        total += tensor.nbytes
    return total


# --------------------------------------------------------------------------- one worker process
def run_worker(config: RunConfig, settings: Settings, repeat: int, load_only: bool = False, tokens_only: bool = False) -> dict[str, Any]:
    """Measure one configuration once, in this (fresh) process; returns the figures as a dict.

    ``load_only``: just the load (to warm the caches); ``tokens_only``: just the greedy tokens of the
    decode prompt (the reference the other rows are compared with, when its row is not run).
    """
    if settings.threads:
        torch.set_num_threads(settings.threads)
    runner = make_runner(config, settings)  # imports the engine
    result: dict[str, Any] = {"config": config.name, "repeat": repeat}
    start = time.perf_counter()
    with torch.no_grad():
        runner.load()
    result["load_s"] = time.perf_counter() - start
    if load_only:
        return result
    vocab_size = runner.vocab_size
    prompt = prompt_ids(settings.prompt_tokens, vocab_size)
    if tokens_only:
        return {**result, "greedy_tokens": runner.generate(prompt, settings.new_tokens)[1], "tokens_only": True}
    result["first_token_s"] = result["load_s"] + time_to_first_token(runner, prompt)
    runner.generate(prompt, 8)  # warm-up
    stamps, tokens = runner.generate(prompt, settings.new_tokens)
    result["decode_tok_s"] = (len(stamps) - 1) / (stamps[-1] - stamps[0])
    result["decode_tokens"] = len(stamps)
    result["greedy_tokens"] = tokens
    result["rss_decode_mb"] = peak_rss_mb()
    if isinstance(runner.model, torch.nn.Module):
        result["bytes_per_token"] = bytes_per_token(runner.model)
    for length in settings.prefill_lengths:
        if repeat == 0 or length < settings.long_prefill:
            result[f"prefill_{length}_tok_s"] = length / time_to_first_token(runner, prompt_ids(length, vocab_size))
    result["rss_peak_mb"] = peak_rss_mb()
    result["threads"] = torch.get_num_threads()
    return result


def time_to_first_token(runner: Any, prompt: list[int]) -> float:
    """Seconds from calling generate until the first new token exists (the prompt's prefill)."""
    start = time.perf_counter()
    return runner.generate(prompt, 1)[0][0] - start


def spawn_worker(config: RunConfig, settings: Settings, repeat: int, load_only: bool = False, tokens_only: bool = False) -> dict[str, Any]:
    """Run :func:`run_worker` in a fresh interpreter and return its figures (or the error)."""
    job = {"config": config.name, "settings": asdict(settings), "repeat": repeat, "load_only": load_only, "tokens_only": tokens_only}
    command = [sys.executable, "-m", "benchmarks.bench", "--worker", json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True, env=worker_environment())
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER) :])
    return {"config": config.name, "repeat": repeat, "error": (done.stderr or done.stdout).strip()[-3000:]}


def worker_environment() -> dict[str, str]:
    """This process's environment, with the repository root on ``PYTHONPATH`` so that the worker
    finds ``benchmarks`` from any working directory."""
    paths = [str(REPOSITORY), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def worker_main(job_json: str) -> None:
    """Entry point of a worker process: read the job, measure, print one marked JSON line."""
    job = json.loads(job_json)
    raw = job["settings"]
    settings = Settings(**{**raw, "prefill_lengths": tuple(raw["prefill_lengths"])})
    result = run_worker(RunConfig.parse(job["config"]), settings, job["repeat"], job["load_only"], job.get("tokens_only", False))
    print(RESULT_MARKER + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- the whole run
@dataclass
class Report:
    """Medians and samples per configuration and metric, plus the machine and the bound."""

    settings: Settings
    machine: dict[str, Any]
    bandwidth_gb_s: float
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # configuration -> why it did not run
    tokens: dict[str, list[int]] = field(default_factory=dict)  # configuration -> its greedy tokens (first run)
    date: str = field(default_factory=lambda: datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))

    def add(self, result: dict[str, Any]) -> None:
        name = result["config"]
        if "error" in result:
            self.errors[name] = result["error"]
            return
        if "greedy_tokens" in result:
            self.tokens.setdefault(name, result["greedy_tokens"])
        if result.get("tokens_only"):
            return  # a reference run: its tokens only, not a row of the table
        metrics = self.samples.setdefault(name, {})
        for key, value in result.items():
            if key not in ("config", "repeat") and isinstance(value, (int, float)):
                metrics.setdefault(key, []).append(value)

    def median(self, config: str, metric: str) -> float | None:
        values = self.samples.get(config, {}).get(metric)
        return statistics.median(values) if values else None

    def agreement(self, config: str) -> int | None:
        """Greedy tokens ``config`` shares with minqwen fp32 from the first, or None when either is missing."""
        ours, reference = self.tokens.get(config), self.tokens.get(REFERENCE_CONFIG)
        return agreement(ours, reference) if ours is not None and reference is not None else None

    def bound_tok_s(self, config: str) -> float | None:
        """Decode ceiling from memory bandwidth: bandwidth / bytes read per token."""
        nbytes = self.median(config, "bytes_per_token")
        return self.bandwidth_gb_s * 1e9 / nbytes if nbytes else None

    def to_json(self) -> dict[str, Any]:
        medians = {c: {m: statistics.median(v) for m, v in metrics.items()} for c, metrics in self.samples.items()}
        return {
            "date": self.date,
            "machine": self.machine,
            "settings": asdict(self.settings),
            "bandwidth_gb_s": self.bandwidth_gb_s,
            "medians": medians,
            "bounds_tok_s": {c: self.bound_tok_s(c) for c in self.samples},
            "samples": self.samples,
            "targets": [asdict(t) for t in check_targets(self)],
            "greedy_tokens": self.tokens,
            "agreement_with_fp32": {c: self.agreement(c) for c in self.samples},
            "errors": self.errors,
            "skipped": self.skipped,
            "table": format_table(self),
        }


def reference_config(config: str) -> str | None:
    """The HF row a minqwen row is compared with: the same dtype; int8 and int4 against HF bf16."""
    engine, _, kind = config.partition("-")
    if engine != "minqwen":
        return None
    return "hf-bfloat16" if kind in SCHEMES else f"hf-{kind}"


def ratio(report: Report, config: str, metric: str) -> float | None:
    """minqwen / HF for one metric, or None when either is missing."""
    reference = reference_config(config)
    ours = report.median(config, metric)
    theirs = report.median(reference, metric) if reference else None
    return ours / theirs if ours is not None and theirs else None


def format_cell(report: Report, config: str, metric: str, digits: int) -> str:
    value = report.median(config, metric)
    if value is None:
        return "-"
    factor = ratio(report, config, metric)
    return f"{value:.{digits}f}" + (f" ({factor:.2f}x)" if factor is not None else "")


def format_table(report: Report) -> str:
    """A Markdown table of medians; minqwen rows show (minqwen / HF) after each figure."""
    prefill = [f"prefill {n} tok/s" for n in report.settings.prefill_lengths]
    header = ["config", "decode tok/s", "bound tok/s", "% of bound", *prefill, "load s", "first token s", "peak RSS MB", "agrees with fp32"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for config in report.samples:
        bound, decode = report.bound_tok_s(config), report.median(config, "decode_tok_s")
        cells = [
            config,
            format_cell(report, config, "decode_tok_s", 1),
            f"{bound:.1f}" if bound else "-",
            f"{100 * decode / bound:.0f} %" if bound and decode else "-",
            *(format_cell(report, config, f"prefill_{n}_tok_s", 1) for n in report.settings.prefill_lengths),
            format_cell(report, config, "load_s", 2),
            format_cell(report, config, "first_token_s", 2),
            format_cell(report, config, "rss_decode_mb", 0),
            "-" if (agreed := report.agreement(config)) is None else f"{agreed}/{len(report.tokens[config])}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass
class Target:
    """One goal of the performance issue, checked on this run's medians."""

    goal: str
    value: float | None
    met: bool | None


def check_targets(report: Report) -> list[Target]:
    """The issue's targets: decode, prefill, load and memory ratios against HF and llama.cpp."""

    def at_least(goal: str, value: float | None, limit: float, higher_is_better: bool = True) -> Target:
        met = None if value is None else (value >= limit if higher_is_better else value <= limit)
        return Target(goal, value, met)

    bf16_decode, bf16_bound = report.median("minqwen-bfloat16", "decode_tok_s"), report.bound_tok_s("minqwen-bfloat16")
    targets = [
        at_least("int8 decode >= 1.0x llama.cpp", versus_llamacpp(report, "minqwen-int8", "decode_tok_s"), 1.0),
        at_least("int4 decode >= 1.3x llama.cpp", versus_llamacpp(report, "minqwen-int4", "decode_tok_s"), 1.3),
        at_least("bf16 decode >= 0.8x its bandwidth bound", bf16_decode / bf16_bound if bf16_decode and bf16_bound else None, 0.8),
        at_least(f"{DEFAULT_FAST_CONFIG} (the default) prefill-1024 >= 1.0x llama.cpp", versus_llamacpp(report, DEFAULT_FAST_CONFIG, "prefill_1024_tok_s"), 1.0),
        at_least(f"{DEFAULT_FAST_CONFIG} (the default) load <= 1.0x llama.cpp", versus_llamacpp(report, DEFAULT_FAST_CONFIG, "load_s"), 1.0, False),
        at_least("int8 peak RSS <= 1.0x llama.cpp", versus_llamacpp(report, "minqwen-int8", "rss_decode_mb"), 1.0, False),
        at_least("int4 peak RSS <= 0.8x llama.cpp", versus_llamacpp(report, "minqwen-int4", "rss_decode_mb"), 0.8, False),
    ]
    for dtype in DTYPES:
        targets.append(at_least(f"{dtype} load <= 0.5x HF", ratio(report, f"minqwen-{dtype}", "load_s"), 0.5, False))
        targets.append(at_least(f"{dtype} peak RSS <= HF", ratio(report, f"minqwen-{dtype}", "rss_decode_mb"), 1.0, False))
    return targets


def versus_llamacpp(report: Report, config: str, metric: str) -> float | None:
    """``config`` / llama.cpp for one metric, or None when either is missing."""
    ours, theirs = report.median(config, metric), report.median(LLAMACPP_CONFIG, metric)
    return ours / theirs if ours is not None and theirs else None


def format_targets(targets: list[Target]) -> str:
    marks = {True: "met", False: "NOT met", None: "not measured"}
    return "\n".join(f"- {t.goal}: " + (f"{t.value:.2f}x, " if t.value is not None else "") + marks[t.met] for t in targets)


def run_benchmark(configs: list[RunConfig], settings: Settings, log: Callable[[str], None] = print) -> Report:
    """Warm the caches, then run every configuration ``settings.repeats`` times, interleaved."""
    from minqwen.hub import resolve

    resolve(settings.checkpoint)  # fetch / convert once, outside any timing
    skipped = {c.name: reason for c in configs if c.engine == "llamacpp" and (reason := llamacpp_missing())}
    configs = [c for c in configs if c.name not in skipped]
    for name, reason in skipped.items():
        log(f"{name}: skipped, {reason}")
    log("warming the caches (one untimed load per configuration) ...")
    for config in configs:
        spawn_worker(config, settings, repeat=-1, load_only=True)
    report = Report(settings, machine_info(), bandwidth_gb_s=measure_bandwidth(), skipped=skipped)
    log(f"memory read bandwidth: {report.bandwidth_gb_s:.1f} GB/s")
    for repeat in range(settings.repeats):
        for config in configs:
            started = time.perf_counter()
            result = spawn_worker(config, settings, repeat)
            report.add(result)
            status = f"error: {result['error'].splitlines()[-1]}" if "error" in result else f"decode {result['decode_tok_s']:.1f} tok/s"
            log(f"repeat {repeat + 1}/{settings.repeats} {config.name}: {status} ({time.perf_counter() - started:.0f} s)")
    if report.tokens and REFERENCE_CONFIG not in report.tokens:
        log(f"greedy reference tokens ({REFERENCE_CONFIG}) ...")
        report.add(spawn_worker(RunConfig.parse(REFERENCE_CONFIG), settings, repeat=-1, tokens_only=True))
    return report


def write_json(report: Report, path: Path) -> None:
    """Write the report atomically: a reader never sees half a file."""
    text = json.dumps(report.to_json(), indent=1) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def default_output() -> Path:
    """``bench-results/bench-<date>.json`` under the current directory (git-ignored in the repo)."""
    return Path("bench-results") / f"bench-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, from: {', '.join(CONFIGS)}")
    parser.add_argument("--checkpoint", default=Settings.checkpoint, help="checkpoint name, .gguf file or HF directory")
    parser.add_argument("--repeats", type=int, default=Settings.repeats, help="runs per configuration (the median is reported)")
    parser.add_argument("--prefill", default=",".join(map(str, Settings.prefill_lengths)), help="prefill lengths, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=Settings.new_tokens, help="decoded tokens per run")
    parser.add_argument("--prompt-tokens", type=int, default=Settings.prompt_tokens, help="prompt length for decoding")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice, one per core)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, prefill 128, 32 new tokens")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default: bench-results/bench-<date>.json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> Settings:
    if args.quick:
        return Settings(args.checkpoint, args.prompt_tokens, 32, (128,), 1, threads=args.threads)
    lengths = tuple(int(n) for n in args.prefill.split(",") if n)
    if args.repeats < 1 or args.new_tokens < 2 or args.prompt_tokens < 1 or any(n < 1 for n in lengths):
        raise SystemExit("--repeats and --prompt-tokens must be >= 1, --new-tokens >= 2, prefill lengths >= 1")
    return Settings(args.checkpoint, args.prompt_tokens, args.new_tokens, lengths, args.repeats, threads=args.threads)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["tokenizer"]:
        from . import tokenizer_bench

        tokenizer_bench.main(argv[1:])
        return
    args = parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return
    try:
        configs = [RunConfig.parse(name.strip()) for name in args.configs.split(",") if name.strip()]
    except ValueError as e:
        raise SystemExit(str(e)) from None
    report = run_benchmark(configs, settings_from_args(args))
    out = args.out or default_output()
    write_json(report, out)
    cpu = report.machine["cpu"]
    print(f"\n{report.date} -- {cpu['model']}, {cpu['cores']} cores, torch {report.machine['torch']} "
          f"(CPU capability {cpu['torch_cpu_capability']}, flags: {' '.join(cpu['flags'])}), "
          f"transformers {report.machine['transformers']}, {report.bandwidth_gb_s:.1f} GB/s read bandwidth\n")
    print(format_table(report))
    print("\nTargets (minqwen / HF, medians of this run):\n" + format_targets(check_targets(report)))
    for name, reason in report.skipped.items():
        print(f"\n{name} skipped: {reason}")
    for name, error in report.errors.items():
        print(f"\n{name} failed:\n{error}")
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
