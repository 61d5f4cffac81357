"""LoRA from scratch (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models").

Fine-tuning all 494M parameters of Qwen2-0.5B needs their gradients and two AdamW moments --
four copies of the model. LoRA freezes the model and learns, for a few chosen matrices W
(out, in), a low-rank change instead::

    W x   becomes   W x + (alpha / r) * B (A x)      A: (r, in), B: (out, r), r << in, out

Only A and B train: for r = 8 on q_proj and v_proj of every layer that is 541K parameters, 0.11 %
of the model. B starts at zero, so the adapted model starts out *exactly* as the original; A starts
random so gradients reach B. After training, ``W + (alpha / r) B A`` can be merged back into a
plain ``nn.Linear`` (no cost at inference), or the adapters saved on their own (a few MB).

    lora.apply(model, r=8, alpha=16, targets=("q_proj", "v_proj"))   # wraps, freezes the rest
    ... train the parameters that require grad ...
    lora.save(model, "my-adapter")        # adapter_config.json + adapter_model.safetensors
    lora.merge(model)                     # back to plain Linear layers
    lora.load(fresh_model, "my-adapter")  # apply + load the saved adapters
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import save_file
from torch import nn

from .loading.files import atomic_directory
from .loading.weights import read_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DEFAULT_TARGETS = ("q_proj", "v_proj")


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: ``base(x) + scaling * B A x``."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r
        weight = base_layer.weight
        self.lora_A = nn.Parameter(torch.empty(r, base_layer.in_features, dtype=weight.dtype, device=weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base_layer.out_features, r, dtype=weight.dtype, device=weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's own init, as in the paper's code
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., in) -> (..., r) -> (..., out): never forms the (out, in) product B A
        return self.base_layer(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """The change LoRA makes to the weight: scaling * B A, shape (out, in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function, with weight W + scaling * B A."""
        base = self.base_layer
        linear = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        linear.weight = nn.Parameter(base.weight + self.delta_weight(), requires_grad=False)
        if base.bias is not None:
            linear.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=False)
        return linear


@dataclass(frozen=True)
class LoRAConfig:
    """Which matrices get adapters, and their shape; saved next to the adapter weights."""

    r: int = 8  # rank of the update
    alpha: float = 16.0  # the update is scaled by alpha / r
    targets: tuple[str, ...] = DEFAULT_TARGETS  # last part of the Linear's name: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
    layers: tuple[int, ...] | None = None  # decoder layers to adapt (None: all)
    dropout: float = 0.0  # dropout on the adapter's input while training

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"LoRA rank r must be an integer >= 1, got {self.r!r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not self.targets:
            raise ValueError(f"targets must be a non-empty sequence of module names such as ('q_proj', 'v_proj'), got {self.targets!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def selects(self, name: str) -> bool:
        """Whether the Linear called ``name`` (e.g. ``model.layers.3.self_attn.q_proj``) gets an adapter."""
        parts = name.split(".")
        if parts[-1] not in self.targets:
            return False
        if self.layers is None:
            return True
        return len(parts) > 2 and parts[:2] == ["model", "layers"] and int(parts[2]) in self.layers


def apply(
    model: nn.Module,
    r: int = 8,
    alpha: float = 16.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
    layers: Sequence[int] | None = None,
    dropout: float = 0.0,
) -> list[str]:
    """Freeze ``model`` and wrap every selected ``nn.Linear`` in a :class:`LoRALinear`, in place.

    targets: last name parts of the Linears to adapt (one name or several); layers: only these decoder layers (fewer
    adapted layers also means backward stops earlier -- much faster on a CPU). Returns the names
    of the wrapped modules. A target that matches nothing is a ``ValueError`` listing what exists.
    """
    targets = (targets,) if isinstance(targets, str) else tuple(targets)
    config = LoRAConfig(r, alpha, targets, None if layers is None else tuple(layers), dropout)
    if adapted_modules(model):
        raise ValueError("the model already has LoRA adapters; merge() them first or start from a fresh model")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    _check_targets(config, linears)
    for param in model.parameters():
        param.requires_grad_(False)
    chosen = [name for name in linears if config.selects(name)]
    for name in chosen:
        _replace(model, name, LoRALinear(linears[name], config.r, config.alpha, config.dropout))
    model.lora_config = config  # remembered for save()
    return chosen


def _check_targets(config: LoRAConfig, linears: dict[str, nn.Linear]) -> None:
    """Every target and layer must select at least one Linear."""
    short_names = sorted({name.split(".")[-1] for name in linears})
    unknown = [t for t in config.targets if t not in short_names]
    if unknown:
        raise ValueError(f"LoRA targets {unknown} match no Linear layer of the model; it has: {', '.join(short_names)}")
    if config.layers is not None:
        existing = {int(name.split(".")[2]) for name in linears if name.startswith("model.layers.")}
        absent = sorted(set(config.layers) - existing)
        if absent:
            raise ValueError(f"LoRA layers {absent} do not exist: the model has layers 0 to {max(existing)}")


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def adapted_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA-wrapped layers of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapter weights: ``<module>.lora_A`` (r, in) and ``<module>.lora_B`` (out, r)."""
    tensors = {}
    for name, module in adapted_modules(model).items():
        tensors[f"{name}.lora_A"] = module.lora_A.detach()
        tensors[f"{name}.lora_B"] = module.lora_B.detach()
    return tensors


def merge(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer's weight, in place: back to plain ``nn.Linear`` layers."""
    for name, module in adapted_modules(model).items():
        _replace(model, name, module.merged())
    if hasattr(model, "lora_config"):
        del model.lora_config
    return model


def save(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``adapter_config.json`` and ``adapter_model.safetensors`` (the adapters only), atomically."""
    if not adapted_modules(model):
        raise ValueError("the model has no LoRA adapters to save (call lora.apply first; merge() removes them)")
    with atomic_directory(Path(path)) as tmp:
        tensors = {k: v.contiguous() for k, v in adapter_state_dict(model).items()}
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(asdict(model.lora_config), indent=2) + "\n", encoding="utf-8")


def load(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Apply the saved adapter configuration to ``model`` and load the saved adapter weights."""
    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path}: no {name} (a LoRA adapter directory written by minqwen.lora.save)")
    saved = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    config = LoRAConfig(**{**saved, "targets": tuple(saved["targets"]),
                           "layers": None if saved["layers"] is None else tuple(saved["layers"])})
    apply(model, config.r, config.alpha, config.targets, config.layers, config.dropout)
    tensors = read_safetensors(path / WEIGHTS_FILE)
    expected = adapter_state_dict(model)
    _check_adapter_tensors(path, expected, tensors)
    with torch.no_grad():
        for name, value in tensors.items():
            expected[name].copy_(value)
    return model


def _check_adapter_tensors(path: Path, expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(n for n in set(expected) & set(got) if expected[n].shape != got[n].shape)
    problems = [f"{label}: {', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"
                for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names]
    if problems:
        raise ValueError(f"{path / WEIGHTS_FILE} does not fit this model: " + "; ".join(problems))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require grad (after :func:`apply`: the adapters only)."""
    return [p for p in model.parameters() if p.requires_grad]
