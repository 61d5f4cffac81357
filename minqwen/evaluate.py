"""Perplexity of a text under a model, with a sliding window (the method of HF's perplexity guide).

Perplexity is ``exp(mean negative log-likelihood per token)``: the number of equally likely
choices the model is, on average, hesitating between. A text longer than the model's context
cannot go through in one pass, and cutting it into disjoint chunks would score each chunk's first
tokens with almost no context. So a window of ``context_length`` tokens slides by ``stride``:
each window scores only the tokens not scored before (its last ``stride``), with the
``context_length - stride`` tokens before them as context. Every token but the first is scored
exactly once; a smaller stride gives each more context and costs more forwards.

    python -m minqwen eval --text notes.txt                           # the real 0.5B, fp32
    python -m minqwen eval --text notes.txt --context-length 512 --stride 256 --dtype bfloat16
    python -m minqwen eval --text notes.txt --checkpoint runs/tiny/step-001500   # a model you trained
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from .loss import IGNORE_INDEX, lm_loss, shift_labels
from .model import Qwen2ForCausalLM
from .quant import SCHEMES

DEFAULT_CONTEXT = 1024


@dataclass(frozen=True)
class Perplexity:
    """The result of :func:`perplexity`."""

    nll: float  # mean negative log-likelihood per scored token, in nats
    tokens: int  # tokens scored (all but the first)
    windows: int  # forward passes made

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    def bits_per_byte(self, num_bytes: int) -> float:
        """Total NLL in bits over the text's UTF-8 bytes: comparable across tokenizers."""
        return self.nll * self.tokens / math.log(2) / num_bytes


def windows(num_tokens: int, context_length: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, first scored index) of every window: ids[begin:end] is fed, ids[first:end] scored."""
    spans, scored_until, begin = [], 0, 0
    while scored_until < num_tokens:
        end = min(begin + context_length, num_tokens)
        spans.append((begin, end, max(scored_until, begin + 1)))
        scored_until, begin = end, begin + stride
    return spans


@torch.no_grad()
def perplexity(
    model: Qwen2ForCausalLM,
    token_ids: Sequence[int] | torch.Tensor,
    context_length: int = DEFAULT_CONTEXT,
    stride: int | None = None,
    progress: bool = False,
) -> Perplexity:
    """Sliding-window perplexity of ``token_ids`` (one long sequence) under ``model``.

    context_length: tokens per forward (at most the model's ``max_position_embeddings``);
    stride: how far the window moves, default ``context_length // 2``.
    """
    ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
    stride = context_length // 2 if stride is None else stride
    _check_settings(model, len(ids), context_length, stride)
    model.eval()
    total_nll, total_tokens = 0.0, 0
    spans = windows(len(ids), context_length, stride)
    for begin, end, first in tqdm(spans, desc="perplexity", unit="window", disable=not progress):
        window = ids[begin:end][None]  # (1, seq)
        labels = window.clone()
        labels[:, : first - begin] = IGNORE_INDEX  # context only: scored by an earlier window
        scored = int((shift_labels(labels) != IGNORE_INDEX).sum())
        total_nll += lm_loss(model, window, labels).item() * scored
        total_tokens += scored
    return Perplexity(total_nll / total_tokens, total_tokens, len(spans))


def _check_settings(model: Qwen2ForCausalLM, num_tokens: int, context_length: int, stride: int) -> None:
    if num_tokens < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {num_tokens}")
    limit = model.config.max_position_embeddings
    if not 2 <= context_length <= limit:
        raise ValueError(f"context_length must be in [2, max_position_embeddings={limit}], got {context_length}")
    if not 1 <= stride <= context_length - 1:
        raise ValueError(f"stride must be in [1, context_length - 1 = {context_length - 1}], got {stride}")


# --------------------------------------------------------------------------- command line
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", required=True, help="a UTF-8 text file")
    parser.add_argument("--checkpoint", default="qwen2.5-coder-0.5b-instruct",
                        help="a known name, a .gguf file or an HF-format directory, e.g. a checkpoint of `train` (default: the real 0.5B)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="weight precision (default: float32)")
    parser.add_argument("--quantize", default=None, choices=SCHEMES, help="weight-only quantisation scheme: int8 or int4 (default: none)")
    parser.add_argument("--context-length", type=int, default=None, help=f"tokens per window (default: {DEFAULT_CONTEXT} or the model's context if smaller)")
    parser.add_argument("--stride", type=int, default=None, help="tokens the window moves each time (default: half the context length)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")


def run(args: argparse.Namespace) -> int:
    """``python -m minqwen eval``: print perplexity, NLL and bits per byte of a text file."""
    from .tokenizer import Tokenizer
    from .loading import from_pretrained

    path = Path(args.text)
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} not found")
    text = path.read_text(encoding="utf-8")
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {"quantize": args.quantize} if args.quantize else {}
    model = from_pretrained(args.checkpoint, dtype=args.dtype, **options)
    ids = Tokenizer.from_pretrained(args.checkpoint).encode(text)
    context = args.context_length or min(DEFAULT_CONTEXT, model.config.max_position_embeddings)
    result = perplexity(model, ids, context, args.stride, progress=True)
    print(f"{path}: {result.tokens:,} tokens scored in {result.windows} windows of {context} | "
          f"perplexity {result.perplexity:.3f} | NLL {result.nll:.4f} nats/token | "
          f"{result.bits_per_byte(len(text.encode('utf-8'))):.4f} bits/byte")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minqwen eval", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
