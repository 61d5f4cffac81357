"""Which dtype a big matrix multiply should run in on this CPU, and a linear layer that follows it.

bf16 halves the bytes of every weight, which is what decoding (one token, memory-bound) wants.
Prefill is different: hundreds of tokens at once make the matrix multiplies compute-bound, and
bf16 GEMM is only fast on CPUs with native bf16 dot products (AVX-512 BF16 or AMX, reported by
oneDNN). On AVX2-only CPUs PyTorch's bf16 GEMM runs about 6x slower than fp32 (15.9 vs 2.7 G
multiply-adds/s per core measured on a 2-core EPYC), so there :class:`CPULinear` widens bf16
operands to fp32 for the multiply and rounds the result back: the same numbers up to summation
order, since bf16 GEMMs accumulate in fp32 too. Weights stay bf16 in memory; the widened copy of
one matrix lives only during its multiply.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

HALF_DTYPES = (torch.bfloat16, torch.float16)
# Up to this many rows (tokens) a product is matrix-vector-like and memory-bound: keep it in bf16.
MEMORY_BOUND_ROWS = 8


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


class CPULinear(nn.Linear):
    """``nn.Linear`` (same parameters, same state dict) that multiplies many rows in :func:`gemm_dtype`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in_features) -> (..., out_features)
        dtype = gemm_dtype(x.dtype, x.device)
        if dtype == x.dtype or x.numel() <= MEMORY_BOUND_ROWS * self.in_features:
            return F.linear(x, self.weight, self.bias)
        bias = None if self.bias is None else self.bias.to(dtype)
        return F.linear(x.to(dtype), self.weight.to(dtype), bias).to(x.dtype)


def use_cpu_linears(model: nn.Module) -> nn.Module:
    """Turn every plain ``nn.Linear`` of ``model`` into a :class:`CPULinear`, in place; returns the model.

    Only the class changes (the weights are not touched or copied), so this is free, and the model
    behaves as before wherever :func:`gemm_dtype` keeps the dtype (fp32 models, bf16-capable CPUs).
    """
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = CPULinear
    return model
