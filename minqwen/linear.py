"""Linear layers that run fast on CPUs with and without native bf16 (a fast path, tested equal).

bf16 halves the bytes of every weight, which is what decoding wants: one token makes every layer
a matrix-vector product that reads each weight once, so memory traffic sets the pace. But how
fast PyTorch's bf16 kernels go depends on the CPU. On CPUs with native bf16 dot products
(AVX-512 BF16 or AMX, reported by oneDNN) plain ``nn.Linear`` is right. On AVX2-only CPUs the
bf16 *matrix-matrix* kernel crawls: prefill (many rows) runs about 6x slower than in fp32
(2.7 vs 15.9 G multiply-adds/s per core, measured on a 2-core AVX2 EPYC). So :class:`CPULinear`
widens bf16 weights to fp32 for products with many rows and rounds the result back -- the same
numbers up to summation order, since bf16 GEMMs accumulate in fp32. Products with a few rows
(decoding) keep PyTorch's bf16 matrix-vector kernel, which reads half the bytes of fp32.

Which path a CPU takes is decided by :func:`cpu_has_fast_bf16_gemm`; the environment variable
``MINQWEN_BF16_GEMM`` forces one (read on every call, so tests and notebooks can switch it):
``native`` multiplies bf16 in bf16, ``fp32`` widens prefill products, ``auto`` (the default) asks
the CPU.

(A column-major layout with the output split over Python threads looked faster in isolation and
was slower in the whole model -- 4.1 vs 7.0 tokens/s -- so the weights keep PyTorch's layout.)
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

HALF_DTYPES = (torch.bfloat16, torch.float16)
# Up to this many rows (tokens) a product is matrix-vector-like and memory-bound.
MEMORY_BOUND_ROWS = 8


# Forces CPULinear's (and the int8 prefill's) GEMM dtype for half-precision inputs on CPUs.
BF16_GEMM_ENV = "MINQWEN_BF16_GEMM"
BF16_GEMM_MODES = ("auto", "native", "fp32")


@functools.cache
def cpu_has_fast_bf16_gemm() -> bool:
    """True when oneDNN runs bf16 matrix multiplies natively on this CPU (AVX-512 BF16 / AMX)."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(probe is not None and probe())


def env_choice(name: str, choices: tuple[str, ...]) -> str:
    """The value of environment variable ``name`` (default: the first choice), checked against ``choices``."""
    return checked_choice(name, os.environ.get(name), choices)


def checked_choice(name: str, value: str | None, choices: tuple[str, ...]) -> str:
    """:func:`env_choice` for a value already read from environment variable ``name`` (None: unset)."""
    value = (value or choices[0]).strip().lower() or choices[0]
    if value not in choices:
        raise ValueError(f"environment variable {name}={value!r}: expected one of {', '.join(choices)}")
    return value


def gemm_dtype(dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """The dtype to multiply ``dtype`` operands in: fp32 for half types on CPUs without fast bf16 GEMM.

    ``MINQWEN_BF16_GEMM=native`` or ``fp32`` overrides what the CPU reports (see the module docstring).
    """
    if torch.device(device).type != "cpu" or dtype not in HALF_DTYPES:
        return dtype
    mode = env_choice(BF16_GEMM_ENV, BF16_GEMM_MODES)
    widen = mode == "fp32" or (mode == "auto" and not cpu_has_fast_bf16_gemm())
    return torch.float32 if widen else dtype


class CPULinear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) with the AVX2 fast paths described above."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in_features) -> (..., out_features)
        dtype = gemm_dtype(x.dtype, x.device)
        if dtype == x.dtype or x.numel() <= MEMORY_BOUND_ROWS * self.in_features:
            return F.linear(x, self.weight, self.bias)  # fp32, a fast-bf16 CPU, or a few rows
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias).to(x.dtype)


def use_cpu_linears(model: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Linear`` of ``model`` into a :class:`CPULinear`, in place; returns the model.

    Only the class changes: parameters, state-dict names and layouts stay as they are (free).
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = CPULinear
    return model
