"""RMSNorm: scale each vector to unit root-mean-square, then by a learned gain.

Qwen2 normalises before attention and before the MLP (pre-norm). Unlike LayerNorm there is no
mean subtraction and no bias: one multiply-add cheaper, and just as stable in practice
(Zhang & Sennrich, 2019).
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x**2) + eps)``, computed in fp32 and cast back (as HF does)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., hidden_size). Statistics in fp32 so bf16 inputs do not lose the small variances.
        # (torch.nn.functional.rms_norm is no faster here: on CPUs torch 2.13 runs it as these same
        # small ops, and it rounds once instead of HF's twice in bf16.)
        input_dtype = x.dtype
        x32 = x.float()
        mean_square = x32.pow(2).mean(dim=-1, keepdim=True)  # (..., 1)
        normalized = x32 * torch.rsqrt(mean_square + self.eps)
        return self.weight * normalized.to(input_dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
