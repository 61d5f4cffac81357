"""Peak memory of Dual Chunk Attention vs sequence length: chunked (linear) vs reference (quadratic).

    python benchmarks/dca_memory.py [--lengths 1024 2048 4096 8192 16384] [--chunk-size 1024]

Each (implementation, length) runs in a fresh subprocess, so the figure is that process's peak RSS
above what it held after creating its inputs (queries for the three parts, keys, values: all
linear in the length). Heads as in Qwen2-0.5B per KV group: 7 query heads on 1 KV head, head_dim 64.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch

from minqwen.dca import INTER, INTRA, SUCCESSIVE, DualChunkSettings, chunked_dca_attention, reference_dca_attention
from minqwen.hardware import peak_rss_mb

HEADS, KV_HEADS, HEAD_DIM = 7, 1, 64
REFERENCE_MAX = 4096  # the reference's (T x T) matrices beyond this take gigabytes


def measure(implementation: str, length: int, chunk_size: int, local_size: int) -> dict:
    """Run one attention over ``length`` tokens in this process; return the extra peak in MB."""
    settings = DualChunkSettings(chunk_size, local_size)
    generator = torch.Generator().manual_seed(0)
    queries = {part: torch.randn(1, HEADS, length, HEAD_DIM, generator=generator) for part in (INTRA, SUCCESSIVE, INTER)}
    k, v = (torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=generator) for _ in range(2))
    inputs_mb = sum(t.nbytes for t in [*queries.values(), k, v]) / 2**20
    before = peak_rss_mb()
    if implementation == "chunked":
        chunked_dca_attention(queries, k, v, 0, settings, HEAD_DIM**-0.5)
    else:
        reference_dca_attention(queries, k, v, torch.arange(length), settings, HEAD_DIM**-0.5)
    return {"implementation": implementation, "length": length, "inputs_mb": round(inputs_mb, 1), "extra_peak_mb": round(peak_rss_mb() - before, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--local-size", type=int, default=128)
    parser.add_argument("--one", nargs=2, metavar=("IMPLEMENTATION", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # the child process
        print(json.dumps(measure(args.one[0], int(args.one[1]), args.chunk_size, args.local_size)))
        return
    print(f"chunk_size {args.chunk_size}, local_size {args.local_size}, {HEADS} heads, head_dim {HEAD_DIM}, fp32")
    print("| implementation | tokens | inputs (MB) | extra peak (MB) |\n|---|---:|---:|---:|")
    for implementation in ("chunked", "reference"):
        for length in args.lengths:
            if implementation == "reference" and length > REFERENCE_MAX:
                continue
            child = [sys.executable, __file__, "--one", implementation, str(length)]
            child += ["--chunk-size", str(args.chunk_size), "--local-size", str(args.local_size)]
            row = json.loads(subprocess.run(child, check=True, capture_output=True, text=True).stdout)
            print(f"| {implementation} | {length} | {row['inputs_mb']} | {row['extra_peak_mb']} |")


if __name__ == "__main__":
    main()
