"""Linear layers that run fast on CPUs with and without native bf16 (a fast path, tested equal).

bf16 halves the bytes of every weight, which is what decoding wants: one token makes every layer
a matrix-vector product that reads each weight once, so memory traffic sets the pace. But how
fast PyTorch's bf16 kernels go depends on the CPU. On CPUs with native bf16 dot products
(AVX-512 BF16 or AMX, reported by oneDNN) plain ``nn.Linear`` is right. On AVX2-only CPUs two
kernels are slow, and :class:`CPULinear` steps around both (figures per core, measured on a
2-core AVX2 EPYC with ``python -m minqwen.bench``'s helpers):

- **Prefill** (many rows): bf16 GEMM runs about 6x slower than fp32 GEMM (2.7 vs 15.9 G
  multiply-adds/s). So the bf16 weights are widened to fp32 for the multiply and the result is
  rounded back -- the same numbers up to summation order, since bf16 GEMMs accumulate in fp32.
- **Decode** (a few rows): the bf16 matrix-vector kernel for a row-major weight (one dot product
  per output) reaches 2.4 G multiply-adds/s; the one for a *column-major* weight (a sum of
  columns, each scaled by one input) reaches 4.4 -- but on a single thread. So the weights are
  kept column-major (``weight`` is then a transposed view: same shape, same state-dict names)
  and the output rows are split over one Python thread per torch thread; PyTorch releases the
  GIL inside the kernel, so the blocks run in parallel.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

HALF_DTYPES = (torch.bfloat16, torch.float16)
# Up to this many rows (tokens) a product is matrix-vector-like and memory-bound.
MEMORY_BOUND_ROWS = 8
ROW_BLOCK = 16  # output rows per thread come in multiples of this (whole vector registers)


@functools.cache
def cpu_has_fast_bf16_gemm() -> bool:
    """True when oneDNN runs bf16 matrix multiplies natively on this CPU (AVX-512 BF16 / AMX)."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe is not None and probe())


def gemm_dtype(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype to multiply ``dtype`` operands in: fp32 for half types on CPUs without fast bf16 GEMM."""
    if torch.device(device).type == "cpu" and dtype in HALF_DTYPES and not cpu_has_fast_bf16_gemm():
        return torch.float32
    return dtype


def wants_column_major(dtype: torch.dtype, device: torch.device | str = "cpu") -> bool:
    """Whether linear weights of ``dtype`` should be stored column-major here (half types on AVX2-only CPUs)."""
    return gemm_dtype(dtype, device) != dtype


def is_column_major(weight: torch.Tensor) -> bool:
    """weight (out, in) stored as the transpose of a contiguous (in, out) matrix."""
    return weight.dim() == 2 and weight.stride(0) == 1 and weight.stride(1) == weight.shape[0]


@functools.cache
def helper_threads(count: int) -> ThreadPoolExecutor:
    """A pool of ``count`` threads for :func:`parallel_matvec`, made once per count."""
    return ThreadPoolExecutor(max_workers=count, thread_name_prefix="minqwen-matvec")


def parallel_matvec(matrix: torch.Tensor, vector: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """``matrix @ vector`` with the output rows split into one block per thread.

    matrix (out, in), column-major for speed; vector (in,) -> (out,). The first block runs here,
    the others on helper threads; each writes its own slice of the output.
    """
    threads = threads or torch.get_num_threads()
    matrix, vector = matrix.detach(), vector.detach()  # inference only; helper threads run with grad mode on
    out = torch.empty(matrix.shape[0], dtype=vector.dtype, device=vector.device)
    step = -(-matrix.shape[0] // (threads * ROW_BLOCK)) * ROW_BLOCK  # rows per block, rounded up
    blocks = [slice(start, start + step) for start in range(0, matrix.shape[0], step)]
    pool = helper_threads(len(blocks) - 1) if len(blocks) > 1 else None
    futures = [pool.submit(torch.mv, matrix[block], vector, out=out[block]) for block in blocks[1:]]
    torch.mv(matrix[blocks[0]], vector, out=out[blocks[0]])
    for future in futures:
        future.result()
    return out


class CPULinear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) with the AVX2 fast paths described above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in_features) -> (..., out_features)
        dtype = gemm_dtype(x.dtype, x.device)
        rows = x.numel() // self.in_features
        if dtype == x.dtype:  # fp32, or a CPU whose bf16 kernels are fast
            return F.linear(x, self.weight, self.bias)
        if rows > MEMORY_BOUND_ROWS:
            bias = None if self.bias is None else self.bias.to(dtype)
            return F.linear(x.to(dtype), self.weight.to(dtype), bias).to(x.dtype)
        if is_column_major(self.weight) and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
            return self._column_major_rows(x)
        return F.linear(x, self.weight, self.bias)

    def _column_major_rows(self, x: torch.Tensor) -> torch.Tensor:
        """A few rows, one parallel matrix-vector product each (inference only: no autograd)."""
        out = torch.stack([parallel_matvec(self.weight, row) for row in x.reshape(-1, self.in_features)])
        if self.bias is not None:
            out += self.bias
        return out.view(*x.shape[:-1], self.out_features)


def use_cpu_linears(model: nn.Module, column_major: bool | None = None) -> nn.Module:
    """Turn every plain ``nn.Linear`` of ``model`` into a :class:`CPULinear`, in place; returns the model.

    ``column_major`` (default: :func:`wants_column_major` for the weights' dtype) also re-lays the
    weights out column-major -- a copy; :mod:`minqwen.prepared` stores them that way instead, so
    loading stays a memory map. Elsewhere only the class changes (free, nothing copied).
    """
    for module in model.modules():
        if type(module) is not nn.Linear:
            continue
        module.__class__ = CPULinear
        weight = module.weight
        relayout = wants_column_major(weight.dtype, weight.device) if column_major is None else column_major
        shared = any(weight is p for name, p in model.named_parameters() if "embed_tokens" in name)  # a tied head
        if relayout and not is_column_major(weight) and not shared:
            module.weight = nn.Parameter(weight.detach().t().contiguous().t(), requires_grad=weight.requires_grad)
    return model
