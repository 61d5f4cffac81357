"""The SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))`` (Shazeer, 2020).

The gate decides, per hidden unit, how much of ``up(x)`` passes; SiLU makes that gate smooth.
With three matrices instead of two, a hidden width of ``8/3 * hidden`` (about 2.67x) keeps the
parameter count of the classic 4x two-matrix MLP; that is the width Shazeer's paper and LLaMA use.
Qwen2 is wider than that: Qwen2-0.5B has 4864 for a width of 896 (about 5.4x), as published in
its config, which is all we know of the choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Qwen2Config


class Qwen2MLP(nn.Module):
    """SwiGLU MLP with HF's names ``gate_proj``, ``up_proj``, ``down_proj`` (no biases)."""

    def __init__(self, config: Qwen2Config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (batch, seq, hidden) -> (batch, seq, intermediate) -> (batch, seq, hidden)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
