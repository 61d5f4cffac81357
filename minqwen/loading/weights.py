"""safetensors files and HF-format directories (``config.json`` + safetensors), read and written.

safetensors is a tiny format: 8 bytes giving the header length, a JSON header mapping each
tensor name to its dtype, shape and byte range, then the raw bytes. We read it ourselves with a
memory map, so a tensor is a *view* of the file (one copy of the weights in memory, loaded
lazily by the OS) and nothing is ever unpickled.

:func:`load_state_dict` is the one place where tensors go into a model: it checks the names and
shapes, restores a tied head, and assigns the tensors (no copy) to a model built on ``meta``.
"""

from __future__ import annotations

import json
import math
import mmap
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..config import Qwen2Config
from ..model import Qwen2ForCausalLM
from ..quant import quantize
from .files import atomic_file

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# --------------------------------------------------------------------------- reading
def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of one ``.safetensors`` file as memory-mapped views (copy-on-write)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        header_len = int.from_bytes(prefix, "little")
        if 8 + header_len > size:
            raise ValueError(f"{path}: truncated safetensors file (header of {header_len} bytes, file {size} bytes)")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: corrupt safetensors header ({e})") from None
        buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    data_start = 8 + header_len
    header.pop("__metadata__", None)
    return {name: _tensor_view(path, buffer, data_start, size, name, info) for name, info in header.items()}


def _tensor_view(path: Path, buffer: mmap.mmap, data_start: int, size: int, name: str, info: dict) -> torch.Tensor:
    """One tensor of a safetensors file, after checking its header entry against the file."""
    try:
        dtype = SAFETENSORS_DTYPES[info["dtype"]]
        shape = [int(n) for n in info["shape"]]
        begin, end = (int(n) for n in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{path}: corrupt header entry for tensor {name!r}: {info!r}") from None
    numel = math.prod(shape)
    if end - begin != numel * dtype.itemsize:
        raise ValueError(f"{path}: tensor {name!r} {shape} {info['dtype']} needs {numel * dtype.itemsize} bytes, header gives {end - begin}")
    if data_start + end > size:
        raise ValueError(f"{path}: truncated: tensor {name!r} ends at byte {data_start + end}, file has {size}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype, count=numel, offset=data_start + begin).view(shape)


def weight_files(path: Path) -> list[Path]:
    """The weight files of an HF directory: ``model.safetensors``, or the index and its shards."""
    if (path / SINGLE_FILE).is_file():
        return [path / SINGLE_FILE]
    if (path / INDEX_FILE).is_file():
        index = json.loads((path / INDEX_FILE).read_text(encoding="utf-8"))
        shards = sorted(set(index.get("weight_map", {}).values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(f"{path}: shard(s) listed in {INDEX_FILE} are missing: {', '.join(missing)}")
        return [path / INDEX_FILE, *(path / s for s in shards)]
    raise FileNotFoundError(
        f"{path}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE} with its shards; "
        "minqwen never loads pickled .bin/.pt files)"
    )


def read_checkpoint_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an HF directory: ``model.safetensors``, or shards listed in the index."""
    state_dict: dict[str, torch.Tensor] = {}
    for file in weight_files(Path(path)):
        if file.name != INDEX_FILE:
            state_dict.update(read_safetensors(file))
    return state_dict


# --------------------------------------------------------------------------- checking and loading
def check_dtype(dtype: object) -> torch.dtype:
    """Accept a floating torch dtype (or its name, e.g. "bfloat16"); anything else is a ValueError."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be a torch floating-point dtype such as torch.bfloat16, got {dtype!r}")
    return dtype


def meta_model(config: Qwen2Config, scheme: str | None = None, attn_implementation: str = "sdpa") -> Qwen2ForCausalLM:
    """The model's skeleton on the ``meta`` device (no memory, no random init), int8 where ``scheme`` says."""
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config, attn_implementation)
        return quantize(model, scheme) if scheme else model


def expected_shapes(model: Qwen2ForCausalLM) -> dict[str, tuple[int, ...]]:
    """State-dict key -> shape for ``model`` (a tied head is not expected: checkpoints omit it)."""
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    return shapes


def check_state_dict(config: Qwen2Config, state_dict: dict[str, torch.Tensor], source: str = "state dict", scheme: str | None = None) -> None:
    """Raise ``ValueError`` listing every missing, unexpected or mis-shaped tensor (for ``scheme``'s layers)."""
    expected = expected_shapes(meta_model(config, scheme))
    got = {name: tuple(t.shape) for name, t in state_dict.items()}
    problems = []
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected) - {"lm_head.weight"})
    wrong = sorted(n for n in set(expected) & set(got) if expected[n] != got[n])
    if missing:
        problems.append("missing: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected: " + ", ".join(unexpected))
    if wrong:
        problems.append("wrong shape: " + ", ".join(f"{n} expected {expected[n]} got {got[n]}" for n in wrong))
    if problems:
        raise ValueError(f"{source} does not match the model: " + "; ".join(problems))


def load_state_dict(
    model: Qwen2ForCausalLM, state_dict: dict[str, torch.Tensor], dtype: torch.dtype | None = None, source: str = "state dict", scheme: str | None = None
) -> Qwen2ForCausalLM:
    """Put the tensors into ``model`` (built on any device, ``meta`` included), checked first.

    Floating tensors are cast to ``dtype`` when given (integer ones, int8 weights, never are);
    tensors already right are used as they are (no copy). A tied head is restored afterwards.
    """
    check_state_dict(model.config, state_dict, source, scheme)
    if model.config.tie_word_embeddings:
        state_dict = {k: v for k, v in state_dict.items() if k != "lm_head.weight"}
        state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"]
    if dtype is not None:
        state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.tie_weights()
    return model


def build_model(
    config: Qwen2Config,
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype | None = None,
    attn_implementation: str = "sdpa",
    source: str = "state dict",
    scheme: str | None = None,
) -> Qwen2ForCausalLM:
    """A model with these weights, built on ``meta`` so no memory is spent on a random init."""
    model = load_state_dict(meta_model(config, scheme, attn_implementation), state_dict, dtype, source, scheme)
    return model.eval()


def load_hf_dir(path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> Qwen2ForCausalLM:
    """Load an HF-format directory as it is (no cache, no prepared copy), in ``dtype``."""
    path = Path(path)
    config = Qwen2Config.from_json(path / "config.json")
    return build_model(config, read_checkpoint_dir(path), check_dtype(dtype), attn_implementation, source=str(path))


# --------------------------------------------------------------------------- saving
def save_pretrained(model: Qwen2ForCausalLM, path: str | Path) -> None:
    """Write ``config.json`` and ``model.safetensors`` that HF's ``from_pretrained`` can load.

    A tied head is not written (HF omits it too). Each file appears atomically.
    """
    path = Path(path)
    state_dict = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state_dict.pop("lm_head.weight")
    config = model.config.to_dict()
    config["torch_dtype"] = str(model.lm_head.weight.dtype).removeprefix("torch.")
    with atomic_file(path / SINGLE_FILE) as tmp:
        save_file(state_dict, tmp, metadata={"format": "pt"})
    with atomic_file(path / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
