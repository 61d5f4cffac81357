"""The SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))`` (Shazeer, 2020).

The gate decides, per hidden unit, how much of ``up(x)`` passes; SiLU makes that gate smooth.
Three matrices instead of two, so Qwen2 uses a hidden width of about 5.4x (not 4x) the model width.
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
