"""Loading checkpoints: resolve a name to a local directory, prepare the wanted variant, load.

- :mod:`~minqwen.loading.files`: the cache directory, its lock, atomic files and directories.
- :mod:`~minqwen.loading.weights`: safetensors and HF-format directories; the one state-dict loader.
- :mod:`~minqwen.loading.gguf`: GGUF metadata to config and tokenizer files, tensors to a state dict.
- :mod:`~minqwen.loading.hub`: names, registry and hub downloads, :func:`~minqwen.loading.hub.resolve`.
- :mod:`~minqwen.loading.prepared`: cached dtype / int8 / int4 copies of a checkpoint.
"""

from __future__ import annotations

import os

import torch

from ..config import Qwen2Config
from .. import qdot
from ..linear import use_cpu_linears
from ..model import Qwen2ForCausalLM
from ..quant import Int4Linear, Int8Linear, aligned, int8_kernel_available
from . import hub
from .prepared import Variant, check_scheme, prepared_state_dict
from .weights import build_model, check_dtype, save_pretrained

__all__ = ["from_pretrained", "save_pretrained", "hub", "check_device"]


def check_device(device: str | torch.device, scheme: str | None = None) -> torch.device:
    """``device`` as a ``torch.device`` this machine has (and with an int8 kernel, for ``scheme``), else ``ValueError``."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device must be 'cpu', 'cuda', 'mps' or a torch.device, got {device!r} ({e})") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, True):
        raise ValueError(f"device {str(device)!r} is not available on this machine (torch {torch.__version__})")
    if scheme == "int8" and not int8_kernel_available(device):
        raise ValueError(f"quantize='int8' needs the int8 kernel, which device {str(device)!r} does not have; use the CPU or no quantization")
    return device


def from_pretrained(
    name_or_path: str | os.PathLike = hub.DEFAULT_CHECKPOINT,
    dtype: torch.dtype | str = torch.float32,
    attn_implementation: str = "sdpa",
    quantize: str | None = None,
    device: str | torch.device = "cpu",
) -> Qwen2ForCausalLM:
    """Load a Qwen2 checkpoint: a known name, a local ``.gguf``, an HF directory or a hub repo id.

    Three steps: **resolve** the name to a local HF-format directory (fetched / converted once
    into the cache, see :mod:`minqwen.loading.hub`); **prepare** the weights in ``dtype`` (and
    ``quantize="int8"`` or ``"int4"``, see :mod:`minqwen.quant`), through a cached copy when the checkpoint is
    stored otherwise (:mod:`minqwen.loading.prepared`); **load** them into a model built on the
    ``meta`` device, then move it to ``device``. On the CPU, every later call is a memory map.
    """
    dtype = check_dtype(dtype)  # fail on bad settings before any download
    check_scheme(quantize)
    device = check_device(device, quantize)

    directory = hub.resolve(name_or_path)
    config = Qwen2Config.from_json(directory / "config.json")
    state_dict = prepared_state_dict(directory, config, Variant(dtype, quantize))
    cast_to = None if quantize else dtype  # quantised weights and their scales stay as prepared
    model = build_model(config, state_dict, cast_to, attn_implementation, str(directory), quantize)
    if device.type != "cpu":
        return model.to(device)
    if quantize:
        prepare_kernels(model)
    return use_cpu_linears(model)


def prepare_kernels(model: Qwen2ForCausalLM) -> None:
    """Ready a quantised model's kernels now rather than on the first token: minqwen's integer
    dot-product kernel is compiled (once per machine, cached) or, where it cannot be, PyTorch's
    int4 kernel gets its re-ordered copies of the weights (which cost memory, so only then)."""
    dot_kernel_missing = qdot.kernel() is None
    for module in model.modules():
        if isinstance(module, Int8Linear):  # PyTorch's kernel needs aligned weights (prepared copies have them)
            module.weight = aligned(module.weight)
        elif isinstance(module, Int4Linear) and dot_kernel_missing and module.kernel_ready():
            module.pack_for_kernel()
