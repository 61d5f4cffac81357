"""The command line: ``python -m minqwen [COMMAND] ...``.

    python -m minqwen "The capital of France is"          # no command: generate (int8 weights on a CPU)
    python -m minqwen "The capital of France is" --dtype float32   # exact: fp32 weights and activations
    python -m minqwen generate "def fib(n):" --max-new-tokens 64 --temperature 0.7 --seed 0
    python -m minqwen generate "def fib(n):" --device auto   # a GPU when there is one (cuda, then mps)
    python -m minqwen generate "def fib(n):" --dtype bfloat16 --quantize int4   # the smallest weights
    python -m minqwen chat --system "You are a terse assistant."
    python -m minqwen eval --text notes.txt --stride 512
    python -m minqwen train --out-dir runs/tiny

Commands live in :data:`COMMANDS`. To add one, write ``add_arguments(parser)`` and
``run(args) -> exit code`` and add a :class:`Command` entry. Errors in the user's input
(``ValueError``, a missing file) print one line and exit 1, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import evaluate
from .chat import DEFAULT_CHAT_MAX_NEW_TOKENS, Chat
from .generate import DEFAULT_MAX_NEW_TOKENS, stream
from .hardware import pick_device
from .loading.hub import DEFAULT_CHECKPOINT
from .recipes import lora_demo, train_tiny
from .sampling import GenerationConfig
from .tokenizer import Tokenizer
from .loading import from_pretrained
from .quant import SCHEMES

PROG = "python -m minqwen"
GENERATE_SAMPLING = GenerationConfig(max_new_tokens=DEFAULT_MAX_NEW_TOKENS)  # greedy
# Qwen's recommended sampling for its instruct models (their generation_config.json).
CHAT_SAMPLING = GenerationConfig(
    max_new_tokens=DEFAULT_CHAT_MAX_NEW_TOKENS, temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05
)
SAMPLING_FLAGS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed")


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and exit status 2) instead of usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# --------------------------------------------------------------------------- shared options
def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --dtype, --quantize and --device: which weights to load, in which precision, where."""
    parser.add_argument(
        "--checkpoint",
        default=DEFAULT_CHECKPOINT,
        help=f"a known name, a .gguf file or an HF-format directory (default: {DEFAULT_CHECKPOINT}, fetched once and cached)",
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default=None,
        help="activation precision, and weight precision without --quantize; --dtype float32 alone is exact "
        "(default: bfloat16, with int8 weights on a CPU)",
    )
    parser.add_argument(
        "--quantize",
        choices=(*SCHEMES, "none"),
        default=None,
        help="weights of the linear layers: int8, int4 (group-wise, the smallest) or none (--dtype's precision); "
        "default: int8 on a CPU unless --dtype is given, none on a GPU",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu, cuda, cuda:N, mps, or auto: cuda, then mps, then cpu (default: cpu)",
    )


def add_sampling_arguments(parser: argparse.ArgumentParser, defaults: GenerationConfig) -> None:
    """One flag per field of :data:`SAMPLING_FLAGS` (--max-new-tokens, --temperature, ...), defaults from ``defaults``."""

    def default(name: str) -> str:
        value = getattr(defaults, name)
        return "off" if value is None else str(value)

    add = parser.add_argument
    add("--max-new-tokens", type=int, default=defaults.max_new_tokens, metavar="N", help=f"stop after N new tokens (default: {default('max_new_tokens')})")
    add("--temperature", type=float, default=defaults.temperature, metavar="T", help=f"0 = greedy, higher = more varied (default: {default('temperature')})")
    add("--top-k", type=int, default=defaults.top_k, metavar="K", help=f"sample among the K most likely tokens only (default: {default('top_k')})")
    add("--top-p", type=float, default=defaults.top_p, metavar="P", help=f"sample among the most likely tokens holding probability P only (default: {default('top_p')})")
    add("--repetition-penalty", type=float, default=defaults.repetition_penalty, metavar="R", help=f"above 1 discourages repeating tokens (default: {default('repetition_penalty')})")
    add("--seed", type=int, default=defaults.seed, help="make sampling reproducible")


def generation_config_from_args(args: argparse.Namespace) -> GenerationConfig:
    """The settings the flags give, checked (``ValueError``) before anything slow happens."""
    return GenerationConfig(**{name: getattr(args, name) for name in SAMPLING_FLAGS})


def precision(args: argparse.Namespace, device: torch.device) -> tuple[str, str | None, str]:
    """(dtype, quantize, note) from --dtype and --quantize, with the default setting where neither is given.

    The default is the fastest setting whose quality stays within int8's bound (mean next-token
    loss within 2 % of bf16; measured in the README's "Performance"): on a CPU, int8 weights with
    bf16 activations -- int4 is faster still but costs more (+2.4 %). GPUs have no int8 kernel
    here: bf16. ``--dtype float32`` alone is exact; ``--dtype bfloat16`` alone, bf16 weights.
    """
    if args.dtype is None and args.quantize is None:
        if device.type == "cpu":
            return "bfloat16", "int8", "the default: fastest within int8's quality bound; --dtype float32 for exact"
        return "bfloat16", None, "the default on a GPU; --dtype float32 for exact"
    quantize = None if args.quantize in (None, "none") else args.quantize
    dtype = args.dtype or ("bfloat16" if quantize else "float32")
    return dtype, quantize, ""


def load(args: argparse.Namespace):
    """The model and tokenizer named by --checkpoint, in the precision :func:`precision` picks, on
    --device; names that precision and reports the time on stderr."""
    device = pick_device(args.device)  # an unusable device fails before the slow part
    start = time.perf_counter()
    dtype, quantize, note = precision(args, device)
    setting = f"{quantize} weights, {dtype} activations" if quantize else dtype
    print(f"loading {args.checkpoint} ({setting}, {device}{'; ' + note if note else ''}) ...", file=sys.stderr, flush=True)
    model = from_pretrained(args.checkpoint, dtype=dtype, quantize=quantize, device=device)
    tokenizer = Tokenizer.from_pretrained(args.checkpoint)
    print(f"loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    return model, tokenizer


# --------------------------------------------------------------------------- generate
def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the text to continue")
    add_sampling_arguments(parser, GENERATE_SAMPLING)
    add_model_arguments(parser)


def run_generate(args: argparse.Namespace) -> int:
    """Print the prompt, then its continuation as it is generated, then the speed (stderr)."""
    if not args.prompt:
        raise ValueError("the prompt is empty: give some text to continue")
    config = generation_config_from_args(args)
    model, tokenizer = load(args)
    pieces = stream(model, tokenizer, args.prompt, generation_config=config)
    print(args.prompt, end="", flush=True)
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
    finally:
        print(flush=True)
        print(f"[{pieces.stats()}]", file=sys.stderr, flush=True)
    return 0


# --------------------------------------------------------------------------- chat
CHAT_HELP = "/reset starts over, /exit or Ctrl-D leaves, Ctrl-C stops a reply (at the prompt: leaves)"


def add_chat_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", default=None, help="system prompt (default: the chat template's)")
    parser.add_argument("--context-length", type=int, default=None, metavar="N", help="tokens the conversation may use before old turns are dropped (default: the model's context)")
    parser.add_argument("--stats", action="store_true", help="print tokens/s after each reply")
    add_sampling_arguments(parser, CHAT_SAMPLING)
    add_model_arguments(parser)


def read_message() -> str | None:
    """The next user line; None when the user leaves (Ctrl-D, Ctrl-C, /exit)."""
    try:
        line = input("you> ").strip()
    except (EOFError, KeyboardInterrupt):
        print()
        return None
    return None if line in ("/exit", "/quit") else line


def run_chat(args: argparse.Namespace) -> int:
    """An interactive, streaming chat on stdin/stdout."""
    try:
        import readline  # noqa: F401  (line editing and history for input(), where available)
    except ImportError:
        pass
    config = generation_config_from_args(args)
    model, tokenizer = load(args)
    notify = lambda message: print(f"[{message}]", file=sys.stderr, flush=True)  # noqa: E731
    chat = Chat(model, tokenizer, args.system, generation_config=config, context_length=args.context_length, notify=notify)
    print(f"chatting with {args.checkpoint}: {CHAT_HELP}", file=sys.stderr, flush=True)
    while (message := read_message()) is not None:
        if message == "/reset":
            chat.reset()
            print("[conversation cleared]", file=sys.stderr, flush=True)
        elif message.startswith("/"):
            print(f"[unknown command {message}; {CHAT_HELP}]", file=sys.stderr, flush=True)
        elif message:
            reply_once(chat, message, args.stats)
    return 0


def reply_once(chat, message: str, show_stats: bool) -> None:
    """Stream one reply; Ctrl-C cuts it short, a message too long for the context is reported."""
    try:
        reply = chat.stream(message)
    except ValueError as e:
        print(f"[{e}]", file=sys.stderr, flush=True)
        return
    print("qwen> ", end="", flush=True)
    try:
        for piece in reply:
            print(piece, end="", flush=True)
    except KeyboardInterrupt:
        print(" [stopped]", end="")
    print(flush=True)
    if show_stats:
        print(f"[{reply.stats()}]", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the command table
@dataclass(frozen=True)
class Command:
    """One subcommand: a one-line help, its arguments, and what it runs (returns the exit code)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {
    "generate": Command("continue a prompt (greedy unless --temperature > 0)", add_generate_arguments, run_generate),
    "chat": Command("talk to the instruct model in the terminal, replies streamed", add_chat_arguments, run_chat),
    "eval": Command("perplexity of a text file, sliding window", evaluate.add_arguments, evaluate.run),
    "train": Command("train a tiny Qwen2 from scratch (resumes; runs under torchrun too)", train_tiny.add_arguments, train_tiny.run),
    "lora-demo": Command("LoRA-tune the real 0.5B on a made-up fact table, report held-out accuracy", lora_demo.add_arguments, lora_demo.run),
}
DEFAULT_COMMAND = "generate"  # what `python -m minqwen "prompt"` runs


def build_parser() -> ArgumentParser:
    """The top-level parser with one sub-parser per entry of :data:`COMMANDS`."""
    parser = ArgumentParser(
        prog=PROG,
        description="Qwen2 from scratch in plain PyTorch. With no command, continues the prompt (generate).",
        epilog=f'example: {PROG} "The capital of France is"',
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = commands.add_parser(name, help=command.help, description=command.help)
        command.add_arguments(sub)
        sub.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: ``sys.argv[1:]``), run the command, return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv:
        parser.print_help(sys.stderr)
        return 2
    if argv[0] not in COMMANDS and argv[0] not in ("-h", "--help"):
        argv.insert(0, DEFAULT_COMMAND)
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as e:
        print(f"{PROG}: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
