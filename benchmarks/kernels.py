"""How fast the matrix-vector kernels read weights on this CPU: the ceiling under decoding.

    python benchmarks/kernels.py [--threads 1 2]

Decoding one token multiplies one row of activations by every weight matrix, so each kernel is
timed on the shapes of Qwen2-0.5B (q/k/v fused size, MLP, down, head) in GB of weights read per
second. Many distinct matrices of each shape are cycled through so none stays in a cache, as in
the real model. Compare with the memory bandwidth printed first: a kernel far below it is limited
by its arithmetic (e.g. converting bf16 or int8 to fp32), not by memory. PyTorch's kernels and,
where it is built, minqwen's integer dot-product kernel (``minqwen.qdot``) on the same weights.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from minqwen import qdot
from minqwen.hardware import cpu_description, measure_bandwidth
from minqwen.quant import INT4_GROUP_SIZE, pack_int4, quantize_int4, quantize_int8

SHAPES = {"q+k+v": (1152, 896), "gate/up": (4864, 896), "down": (896, 4864), "lm_head": (151936, 896)}
BYTES_PER_SHAPE = 256 * 2**20  # fp32 bytes of the matrices cycled through per shape (beyond any cache)


def gigabytes_per_second(products, weight_bytes: int, repeats: int = 5) -> float:
    """Median GB/s of calling every product once (after a warm-up round)."""
    for product in products:
        product()
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for product in products:
            product()
        rates.append(weight_bytes / (time.perf_counter() - start) / 1e9)
    return sorted(rates)[len(rates) // 2]


def kernels_for(out_features: int, in_features: int) -> dict[str, tuple[list, int]]:
    """Each kernel's products over fresh random weights of one shape, and the bytes they read."""
    count = max(1, BYTES_PER_SHAPE // (4 * out_features * in_features))
    weights = [torch.randn(out_features, in_features) * 0.02 for _ in range(count)]
    x = torch.randn(1, in_features)
    bf16 = [w.bfloat16() for w in weights]
    int8 = [quantize_int8(w) for w in weights]
    int4 = [quantize_int4(w, INT4_GROUP_SIZE) for w in weights]  # (codes (out, in), scales and zero points (out, groups, 2))
    x16, elements = x.bfloat16(), count * out_features * in_features
    int4_bytes = elements // 2 + sum(sz.nbytes for _, sz in int4)
    products = {
        "fp32": ([lambda w=w: F.linear(x, w) for w in weights], 4 * elements),
        "bf16": ([lambda w=w: F.linear(x16, w) for w in bf16], 2 * elements),
        "int8 (bf16 act.)": ([lambda q=q, s=s.bfloat16(): torch._weight_int8pack_mm(x16, q, s) for q, s in int8], elements),
        INT4_NAME: ([lambda q=q, sz=sz: torch._weight_int4pack_mm_for_cpu(x16, q, INT4_GROUP_SIZE, sz) for q, sz in map(torch_int4_operands, int4)], int4_bytes),
    }
    ops = qdot.kernel()
    if ops is not None and qdot.supports(ops, "int8", in_features):
        products[DOT_INT8_NAME] = ([lambda q=q, s=s: ops.int8_linear(x16, q, s, None) for q, s in int8], elements)
    if ops is not None and qdot.supports(ops, "int4", in_features):
        products[DOT_INT4_NAME] = ([lambda c=pack_int4(c), sz=sz: ops.int4_linear(x16, c, sz, None) for c, sz in int4], int4_bytes)
    return products


INT4_NAME = f"int4 g{INT4_GROUP_SIZE} (bf16 act.)"
DOT_INT8_NAME = "int8, integer dot (qdot)"
DOT_INT4_NAME = f"int4 g{INT4_GROUP_SIZE}, integer dot (qdot)"


def torch_int4_operands(quantized: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """What ``torch._weight_int4pack_mm_for_cpu`` reads: the codes packed for this CPU, the scales and zero points by column group."""
    codes, scale_and_zero = quantized
    return torch._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1), scale_and_zero.transpose(0, 1).contiguous()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    args = parser.parse_args()
    cpu = cpu_description()
    print(f"{cpu['model']}, {cpu['cores']} cores, torch CPU capability {cpu['torch_cpu_capability']}, flags: {' '.join(cpu['flags'])}")
    print(f"memory read bandwidth: {measure_bandwidth():.1f} GB/s\n")
    print(f"| kernel | threads | {' | '.join(SHAPES)} |\n|---|---:|{'---:|' * len(SHAPES)}")
    rows: dict[tuple[str, int], list[str]] = {}
    for shape in SHAPES.values():
        kernels = kernels_for(*shape)
        for threads in args.threads:
            torch.set_num_threads(threads)
            for name, (products, weight_bytes) in kernels.items():
                rows.setdefault((name, threads), []).append(f"{gigabytes_per_second(products, weight_bytes):.1f}")
    for (name, threads), cells in rows.items():
        print(f"| {name} | {threads} | {' | '.join(cells)} |")
    print("\nGB of weights read per second (median of 5).")


if __name__ == "__main__":
    main()
