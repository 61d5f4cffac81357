"""Checkpoints prepared for a dtype, int8 or int4, cached so every later load is a memory map.

A checkpoint stored in fp32 and loaded as bf16 (or int8) needs converting: reading 2.5 GB of fp32,
writing a second copy, and holding both in memory for a moment. Done on every load, that is most
of the load time and the peak memory. So the first such load writes the converted tensors once to
``<cache>/prepared/<source>/model.<variant>.<key>.safetensors`` (atomically, under a lock) and every
later load maps that file: no conversion, no second copy, and only the pages a forward actually
touches become resident (most of the embedding table never does).

The file name carries a key of the source files' sizes and modification times, so a changed
checkpoint gets a fresh prepared file (and the stale one is deleted) instead of a wrong one.
The prepared copies can be deleted at any time; they are made again when needed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Qwen2Config
from ..quant import SCHEMES, Int4Linear, Int8Linear, pack_int4, quantize_int4, quantize_int8, scheme_tag
from .files import atomic_file, cache_dir, file_lock
from .weights import SAFETENSORS_DTYPES, check_state_dict, meta_model, read_checkpoint_dir, read_safetensors, weight_files

SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
DATA_ALIGNMENT = 64


def check_scheme(scheme: str | None) -> None:
    """``None`` or a known quantization scheme, else ``ValueError``."""
    if scheme is not None and scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; supported: {', '.join(SCHEMES)} (or None)")


@dataclass(frozen=True)
class Variant:
    """What a prepared copy holds: the dtype of what is not quantised, and the scheme."""

    dtype: torch.dtype
    scheme: str | None = None

    @property
    def name(self) -> str:
        """``"bfloat16"``, ``"int8-bfloat16"``, ``"int4g32-bfloat16"`` ..."""
        name = str(self.dtype).removeprefix("torch.")
        return f"{scheme_tag(self.scheme)}-{name}" if self.scheme else name


def short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepared_path(path: Path, variant: Variant) -> Path:
    """Where the prepared copy of the checkpoint in ``path`` lives in the cache.

    One directory per source directory; the file name carries the variant and a key of the
    source files' sizes and modification times, so a changed checkpoint gets a new copy.
    """
    directory = cache_dir() / "prepared" / f"{path.name}-{short_hash(str(path.resolve()))}"
    key = short_hash("|".join(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in weight_files(path)))
    return directory / f"model.{variant.name}.{key}.safetensors"


def remove_stale_copies(target: Path) -> None:
    """Delete copies of the same variant made from an earlier version of the source."""
    variant = target.name.rsplit(".", 2)[0]  # "model.<variant>"
    for old in target.parent.glob(f"{variant}.*.safetensors"):
        if old != target and old.name.count(".") == target.name.count("."):
            old.unlink(missing_ok=True)


def stored_dtype(state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype of the checkpoint's floating-point tensors (of its embedding table)."""
    return next(t.dtype for name, t in state_dict.items() if "embed_tokens" in name)


def prepare_state_dict(config: Qwen2Config, source: dict[str, torch.Tensor], variant: Variant) -> dict[str, torch.Tensor]:
    """The source tensors as ``variant`` stores them: quantised weights (and their scales) where the scheme puts them."""
    prepared: dict[str, torch.Tensor] = {}
    for name, module in meta_model(config, variant.scheme).named_modules():
        if isinstance(module, Int8Linear):
            weight, scale = quantize_int8(source[f"{name}.weight"])
            prepared[f"{name}.weight"], prepared[f"{name}.weight_scale"] = weight, scale
        elif isinstance(module, Int4Linear):
            codes, scale_and_zero = quantize_int4(source[f"{name}.weight"], module.group_size)
            prepared[f"{name}.weight"], prepared[f"{name}.weight_scale_and_zero"] = pack_int4(codes), scale_and_zero
    for name, tensor in source.items():
        if name not in prepared:
            prepared[name] = tensor.to(variant.dtype).contiguous()
    return prepared


def save_aligned(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str]) -> None:
    """Write a safetensors file whose data starts on a 64-byte boundary.

    Tensors follow one another without gaps (the format allows no holes), largest element size
    first, so each starts aligned when the sizes before it are multiples of 64 bytes -- true for
    Qwen2's shapes. Fused kernels (the int8 one) load their operands with aligned vector loads.
    """
    names = sorted(tensors, key=lambda name: (-tensors[name].element_size(), name))
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name in names:
        tensor = tensors[name]
        header[name] = {"dtype": SAFETENSORS_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % DATA_ALIGNMENT)  # the format pads the header with spaces
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name in names:
            f.write(tensors[name].contiguous().view(torch.uint8).numpy().data)


def write_prepared(target: Path, path: Path, config: Qwen2Config, variant: Variant) -> None:
    """Convert the checkpoint in ``path`` once and write it to ``target`` (atomically, under a lock)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(f"prepared-{target.parent.name}-{target.name}"):
        if target.is_file():
            return
        source = read_checkpoint_dir(path)
        check_state_dict(config, source, str(path))
        with atomic_file(target) as tmp:
            save_aligned(prepare_state_dict(config, source, variant), tmp, {"format": "pt", "source": str(path)})
        remove_stale_copies(target)


def prepared_state_dict(path: Path, config: Qwen2Config, variant: Variant) -> dict[str, torch.Tensor]:
    """The checkpoint in ``path`` as ``variant`` stores it, memory-mapped.

    A checkpoint already stored as wanted is mapped directly; otherwise its prepared copy is
    written on first use and mapped from then on.
    """
    source = read_checkpoint_dir(path)
    if variant == Variant(stored_dtype(source)):
        return source
    target = prepared_path(path, variant)
    if not target.is_file():
        write_prepared(target, path, config, variant)
    return read_safetensors(target)
