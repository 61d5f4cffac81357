"""Passkey retrieval: can the model find five digits hidden in a long, boring text?

The test of Mohtashami & Jaggi (2023, "Landmark Attention"): filler sentences repeated up to the
wanted length, one line "The pass key is 71432. Remember it. 71432 is the pass key." at a chosen
depth, and the question at the end. A model that attends properly at that distance answers with
the digits; past its trained length plain RoPE typically does not.

    python -m minqwen.passkey --length 16384 --method yarn --depth 0.5

``--method`` picks the position scheme on the same weights: ``rope`` (as trained), ``yarn``
(``rope_scaling`` type yarn, ``--factor``, original length = the checkpoint's
``max_position_embeddings``) or ``dca`` (Dual Chunk Attention, ``--chunk-size``/``--local-size``).
The prompt is prefilled in blocks through the KV cache, so memory stays at the cache plus one
block's activations; attention is still quadratic in time.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .cache import KVCache
from .generate import generate_steps
from .hardware import peak_rss_mb
from .loading.hub import DEFAULT_CHECKPOINT
from .model import Qwen2ForCausalLM
from .tokenizer import Tokenizer
from .loading import from_pretrained

METHODS = ("rope", "yarn", "dca")
INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
    "I will quiz you about the important information there.\n\n"
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key?"
ANSWER_PREFIX = "The pass key is"
NEW_TOKENS = 8  # enough for " 71432." and a little more
PREFILL_BLOCK = 1024  # prompt tokens per forward while filling the cache


@dataclass
class PasskeyResult:
    """One run: what was asked, what came back, and what it cost."""

    method: str
    length: int  # requested prompt length in tokens
    tokens: int  # actual prompt length
    depth: float  # where the needle sits, 0 = start of the filler, 1 = end
    passkey: str
    answer: str
    found: bool
    prefill_seconds: float
    total_seconds: float
    peak_rss_gb: float


def passkey_prompt(tokenizer: Tokenizer, length: int, depth: float, passkey: str) -> list[int]:
    """Chat-formatted prompt ids of at most ``length`` tokens with the needle at ``depth`` of the filler.

    The assistant's turn is opened with "The pass key is" so the next tokens are the digits.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be between 0 and 1, got {depth}")

    def prompt_ids(repeats: int) -> list[int]:
        before = round(depth * repeats)
        haystack = FILLER * before + NEEDLE.format(key=passkey) + FILLER * (repeats - before)
        messages = [{"role": "user", "content": INTRO + haystack.strip() + QUESTION}]
        return tokenizer.apply_chat_template(messages, tokenize=True) + tokenizer.encode(ANSWER_PREFIX)

    overhead, per_filler = len(prompt_ids(0)), len(tokenizer.encode(FILLER * 16)) / 16
    if overhead >= length:
        raise ValueError(f"length {length} is too short: the question alone takes {overhead} tokens")
    repeats = int((length - overhead) / per_filler)
    ids = prompt_ids(repeats)
    while len(ids) > length:  # the estimate per filler can be off by a token here and there
        repeats -= 1
        ids = prompt_ids(repeats)
    return ids


def long_context_settings(
    method: str, trained_length: int, factor: float = 4.0, chunk_size: int | None = None, local_size: int | None = None
) -> dict[str, Any]:
    """The ``extend_context`` keywords for a method: plain RoPE, YaRN or DCA over ``trained_length``."""
    if method == "rope":
        return {}
    if method == "yarn":
        return {"rope_scaling": {"type": "yarn", "factor": factor, "original_max_position_embeddings": trained_length}}
    if method == "dca":
        chunk_size = chunk_size or trained_length
        local_size = local_size if local_size is not None else chunk_size // 32  # Qwen2.5-1M's ratio (8K of 256K)
        return {
            "dual_chunk_attention_config": {
                "chunk_size": chunk_size,
                "local_size": local_size,
                "original_max_position_embeddings": trained_length,
            }
        }
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


@torch.no_grad()
def prefill(model: Qwen2ForCausalLM, ids: list[int], cache: KVCache, block: int = PREFILL_BLOCK) -> None:
    """Run ``ids`` into ``cache`` ``block`` tokens at a time (the logits are not needed)."""
    device = model.lm_head.weight.device
    for start in range(0, len(ids), block):
        chunk = torch.tensor([ids[start : start + block]], device=device)
        positions = torch.arange(cache.length, cache.length + chunk.shape[1], device=device)[None]
        model.model(chunk, positions, None, cache)


def run_passkey(
    model: Qwen2ForCausalLM, tokenizer: Tokenizer, method: str, length: int, depth: float = 0.5, seed: int = 0
) -> PasskeyResult:
    """Hide a random 5-digit key, prefill all but the last prompt token, then decode greedily."""
    passkey = str(random.Random(seed).randint(10000, 99999))
    ids = passkey_prompt(tokenizer, length, depth, passkey)
    start = time.perf_counter()
    cache = model.make_cache(1, len(ids) + NEW_TOKENS)
    prefill(model, ids[:-1], cache)
    prefill_seconds = time.perf_counter() - start
    new_ids = []
    for step in generate_steps(model, [ids], NEW_TOKENS, stop_token_ids=tokenizer.eos_token_ids, cache=cache):
        new_ids += [t for t in step.token_ids if t is not None]
    answer = tokenizer.decode(new_ids)
    return PasskeyResult(
        method=method,
        length=length,
        tokens=len(ids),
        depth=depth,
        passkey=passkey,
        answer=answer.strip(),
        found=passkey in answer,
        prefill_seconds=round(prefill_seconds, 1),
        total_seconds=round(time.perf_counter() - start, 1),
        peak_rss_gb=round(peak_rss_mb() / 2**10, 2),
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m minqwen.passkey", description=__doc__.split("\n\n")[0])
    parser.add_argument("--length", type=int, required=True, help="prompt length in tokens, e.g. 16384")
    parser.add_argument("--method", choices=METHODS, required=True, help="position scheme")
    parser.add_argument("--depth", type=float, default=0.5, help="needle depth in the filler, 0..1 (default 0.5)")
    parser.add_argument("--seed", type=int, default=0, help="picks the passkey (default 0)")
    parser.add_argument("--factor", type=float, default=4.0, help="YaRN factor (default 4, as Qwen2.5 suggests)")
    parser.add_argument("--chunk-size", type=int, default=None, help="DCA chunk size (default: the trained length)")
    parser.add_argument("--local-size", type=int, default=None, help="DCA local size (default: chunk size / 32)")
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help=f"weights (default {DEFAULT_CHECKPOINT})")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--json", type=Path, default=None, help="append the result as one JSON line to this file")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; prints one line per run and exits 0 (found) or 1 (not found)."""
    args = parse_args(argv)
    model = from_pretrained(args.checkpoint, dtype=args.dtype)
    tokenizer = Tokenizer.from_pretrained(args.checkpoint)
    trained = model.config.max_position_embeddings
    settings = long_context_settings(args.method, trained, args.factor, args.chunk_size, args.local_size)
    model.extend_context(max(trained, args.length + NEW_TOKENS), **settings)
    result = run_passkey(model, tokenizer, args.method, args.length, args.depth, args.seed)
    verdict = "found" if result.found else "NOT found"
    print(
        f"{result.method} length={result.tokens} depth={result.depth}: passkey {result.passkey} {verdict} "
        f"(answer {result.answer!r}); prefill {result.prefill_seconds:.0f} s, total {result.total_seconds:.0f} s, "
        f"peak RSS {result.peak_rss_gb:.1f} GB"
    )
    if args.json is not None:
        record = {**asdict(result), "settings": settings, "date": time.strftime("%Y-%m-%d")}
        with open(args.json, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    return 0 if result.found else 1


if __name__ == "__main__":
    sys.exit(main())
