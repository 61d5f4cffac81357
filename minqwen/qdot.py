"""Integer dot products for int8 and int4 weights: a decode kernel that never widens a weight.

Decoding one token multiplies each weight matrix by one activation vector: every weight is read
once and used once, so the speed is set by how fast weights stream out of memory. PyTorch's
weight-only kernels (``torch._weight_int8pack_mm``, ``torch._weight_int4pack_mm_for_cpu``)
convert every weight to a float before multiplying; that is several instructions per weight,
and two cores cannot issue them at memory speed (about half of it, measured on the 0.5B).

llama.cpp goes the other way round, and so does this kernel: it quantises the *activation* row
to int8, with one scale ``d`` per block of 32 values (``q = round(x / d)``, ``d = max|x| / 127``),
and multiplies weights and activations as integers -- 4 byte pairs per 32-bit lane and
instruction (AVX-512 VNNI ``vpdpbusd``; AVX2 ``vpmaddubsw`` + ``vpmaddwd``). Each block's
integer sum is scaled once, in float:

    int8 weights:  y[o] = scale[o] * sum_b d_b * (W[o, b] . q_b)
    int4 weights:  y[o] = sum_g scale[o, g] * d_g * (codes[o, g] . q_g) + (zero[o, g] - 8 * scale[o, g]) * d_g * sum(q_g)

The activation's rounding adds an error of its own (relative ~1/254 per block at worst), the
same llama.cpp accepts; the tests bound it and measure what it does to the real model's loss.

The kernel is C++ (``minqwen/csrc/qdot.cpp``), compiled on first use with the system's compiler
through ``torch.utils.cpp_extension`` and cached under ``~/.cache/minqwen/kernels`` (about 10 s,
once per CPU kind and PyTorch version). It has two builds: AVX-512 (BW, VL and VNNI: 64-byte
steps) and AVX2 + FMA (32-byte steps); :func:`cpu_isa` picks the best this CPU runs, and
``MINQWEN_QDOT_ISA=avx2`` forces the narrower one. Without a compiler, or on a CPU with neither,
:func:`kernel` says so in one warning and returns None, and :mod:`minqwen.quant` keeps PyTorch's
kernels. :func:`int8_linear_reference` and :func:`int4_linear_reference` are the same arithmetic
in plain PyTorch: the readable twin the kernel is tested against.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from .hardware import cpu_description
from .linear import checked_choice

BLOCK = 32  # activations: one int8 scale per 32 values (llama.cpp's Q8_0 block)
INT8_MAX = 127
INT4_CENTER = 8
SOURCE = Path(__file__).with_name("csrc") / "qdot.cpp"
ISA_ENV = "MINQWEN_QDOT_ISA"
ISA_CHOICES = ("auto", "avx512_vnni", "avx2")
# What each build needs from the CPU (/proc/cpuinfo names) and what it is compiled with.
ISA_CPU_FLAGS = {
    "avx512_vnni": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c"),
    "avx2": ("avx2", "fma", "f16c"),
}
ISA_COMPILE_FLAGS = {
    "avx512_vnni": ("-DQDOT_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c"),
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
}


# --------------------------------------------------------------------------- the PyTorch twin
def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, in) float -> q int8 (rows, in / 32, 32) and d fp32 (rows, in / 32, 1), x ~= q * d per block.

    ``d = max|x| / 127`` per block of 32 (0 for an all-zero block, whose q is 0), ``q = round(x / d)``
    (half to even): exactly what the C++ kernel computes, so their integer sums agree.
    """
    blocks = x.float().reshape(x.shape[0], -1, BLOCK)  # (rows, in / 32, 32)
    d = blocks.abs().amax(dim=-1, keepdim=True) / INT8_MAX
    q = torch.where(d > 0, torch.round(blocks / d), torch.zeros_like(blocks)).clamp_(-INT8_MAX, INT8_MAX)
    return q.to(torch.int8), d


def block_dots(q: torch.Tensor, weight_blocks: torch.Tensor) -> torch.Tensor:
    """Integer dot products per block: q (rows, blocks, 32) x weights (out, blocks, 32) -> (rows, out, blocks).

    Computed in float64, which is exact here (|sum| <= 32 * 127 * 127 < 2**53): the integers the kernel sums.
    """
    return torch.einsum("rbk,obk->rob", q.double(), weight_blocks.double())


def int8_linear_reference(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What :func:`int8_linear` computes, in plain PyTorch: x (rows, in), weight int8 (out, in), scale (out,) -> (rows, out)."""
    q, d = quantize_activations(x)
    dots = block_dots(q, weight.reshape(weight.shape[0], -1, BLOCK))  # (rows, out, blocks)
    y = (dots * d.double().transpose(1, 2)).sum(-1) * scale.double()  # d: (rows, 1, blocks)
    return finish(y, x, bias)


def int4_linear_reference(x: torch.Tensor, codes: torch.Tensor, scale_and_zero: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """What :func:`int4_linear` computes, in plain PyTorch.

    x (rows, in); codes uint8 (out, in / 2), two per byte, the even input in the low nibble;
    scale_and_zero bf16 (out, in / 32, 2). A weight is ``(code - 8) * scale + zero``.
    """
    q, d = quantize_activations(x)
    unpacked = torch.stack([codes & 0x0F, codes >> 4], dim=-1).reshape(codes.shape[0], -1, BLOCK)  # (out, groups, 32)
    dots = block_dots(q, unpacked)  # (rows, out, groups)
    d = d.double().transpose(1, 2)  # (rows, 1, groups)
    block_sums = d * q.double().sum(-1)[:, None, :]  # d_g * sum(q_g): (rows, 1, groups)
    scale, zero = scale_and_zero.double().unbind(-1)  # (out, groups) each
    y = (scale * d * dots + (zero - INT4_CENTER * scale) * block_sums).sum(-1)
    return finish(y, x, bias)


def finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Add the bias and return x's dtype, as the kernel does."""
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


# --------------------------------------------------------------------------- the C++ kernel
@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags that matter here (read once: /proc/cpuinfo is slow to parse)."""
    return frozenset(cpu_description()["flags"])


def cpu_isa() -> str | None:
    """The kernel build to use: ``MINQWEN_QDOT_ISA`` if set, else the widest this CPU runs (None: neither)."""
    return isa_for(os.environ.get(ISA_ENV), cpu_flags())


@functools.cache
def isa_for(setting: str | None, flags: frozenset[str]) -> str | None:
    """:func:`cpu_isa` for one value of the switch and one set of CPU flags (remembered: asked per layer call)."""
    wanted = checked_choice(ISA_ENV, setting, ISA_CHOICES)
    runnable = [isa for isa, needs in ISA_CPU_FLAGS.items() if set(needs) <= flags]
    if wanted == "auto":
        return runnable[0] if runnable else None
    if wanted not in runnable:
        raise ValueError(f"{ISA_ENV}={wanted}, but this CPU lacks {sorted(set(ISA_CPU_FLAGS[wanted]) - flags)}")
    return wanted


def kernel(isa: str | None = "auto") -> Any | None:
    """The kernel's operators (``int8_linear``, ``int4_linear``, ``step_bytes``) for ``isa``, or None.

    ``"auto"`` means :func:`cpu_isa`. Built on first use and cached on disk; a build that fails
    (no compiler, say), or a CPU with neither instruction set, warns once and gives None, and the
    callers keep PyTorch's kernels.
    """
    isa = cpu_isa() if isa == "auto" else isa
    if isa is None:
        warn_no_isa(cpu_flags())
        return None
    return load_kernel(isa)


@functools.cache
def warn_no_isa(flags: frozenset[str]) -> None:
    """Say once (per set of CPU flags) that this CPU runs neither build."""
    warnings.warn(
        "minqwen: this CPU has neither AVX-512 VNNI nor AVX2 + FMA (or is not x86), so the integer-dot "
        "kernel does not run here; int8/int4 use PyTorch's kernels", RuntimeWarning, stacklevel=3,
    )


@functools.cache
def load_kernel(isa: str) -> Any | None:
    """Compile (once, cached on disk) and load the ``isa`` build; None with one warning if that fails."""
    try:
        return build_and_load(isa)
    except Exception as e:  # no compiler, no ninja, a compiler too old for the instructions ...
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        warnings.warn(f"minqwen: the integer-dot kernel ({isa}) is unavailable, int8/int4 use PyTorch's kernels: {reason}", RuntimeWarning, stacklevel=3)
        return None


def build_and_load(isa: str) -> Any:
    """The ``isa`` build's operator namespace, compiling it into the cache the first time."""
    from torch.utils import cpp_extension

    from .loading.files import build_directory, cache_dir

    name = f"minqwen_qdot_{isa}"
    if loaded_operators(name) is not None:  # already in this process (a library cannot be loaded twice)
        return loaded_operators(name)
    # -fopenmp: at::parallel_for is an OpenMP loop in the header; without the flag it runs on one
    # thread. Not linked here: the symbols resolve to the OpenMP runtime PyTorch itself loads.
    flags = ("-O3", "-fopenmp", f"-DQDOT_NAMESPACE={name}", *ISA_COMPILE_FLAGS[isa])
    key = hashlib.sha256("|".join([SOURCE.read_text(), torch.__version__, *flags]).encode()).hexdigest()[:16]
    target = cache_dir() / "kernels" / f"{name}-{key}"
    loaded = []

    def build(directory: Path) -> None:
        with ninja_on_path():
            cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=list(flags), build_directory=str(directory), is_python_module=False)
        loaded.append(True)

    build_directory(build, target)
    if not loaded:  # built earlier (or by another process): just map the library
        torch.ops.load_library(str(target / f"{name}.so"))
    return getattr(torch.ops, name)


def loaded_operators(name: str) -> Any | None:
    """The operator namespace ``name`` if a library registering it is loaded, else None."""
    namespace = getattr(torch.ops, name)
    try:
        namespace.step_bytes  # resolving an operator fails unless the library is loaded
    except (AttributeError, RuntimeError):
        return None
    return namespace


@functools.cache
def step_bytes(ops: Any) -> int:
    """Bytes of weights the build reads per inner-loop step: 64 (AVX-512) or 32 (AVX2)."""
    return int(ops.step_bytes())


@contextlib.contextmanager
def ninja_on_path() -> Iterator[None]:
    """Put the ``ninja`` package's binary on PATH while building (a venv's bin is not on it unless activated)."""
    try:
        import ninja
    except ImportError:
        yield  # torch looks for a system ninja and says so if there is none
        return
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


def supports(ops: Any, scheme: str, in_features: int, group_size: int = BLOCK) -> bool:
    """Whether the kernel takes a layer: in_features a multiple of its step (int4: two steps, groups of 32)."""
    step = step_bytes(ops)
    return in_features % step == 0 if scheme == "int8" else (group_size == BLOCK and in_features % (2 * step) == 0)


# --------------------------------------------------------------------------- checked entry points
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def int8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (rows, in) @ (scale[:, None] * weight).T + bias with the kernel: weight int8 (out, in), scale fp32 (out,).

    The operands are checked first (``ValueError`` naming the problem); the layers of
    :mod:`minqwen.quant` call the operator directly, their operands being right by construction.
    """
    ops = checked_kernel(x, weight.shape[0], bias)
    expect(weight.dtype == torch.int8 and weight.dim() == 2 and weight.is_contiguous(), f"weight must be a contiguous int8 (out, in) matrix, got {weight.dtype} {tuple(weight.shape)}")
    expect(scale.dtype == torch.float32 and scale.shape == (weight.shape[0],) and scale.is_contiguous(), f"scale must be a contiguous float32 vector of {weight.shape[0]}, got {scale.dtype} {tuple(scale.shape)}")
    expect_inputs(ops, x, weight.shape[1], "int8")
    return ops.int8_linear(x, weight, scale, bias)


def int4_linear(x: torch.Tensor, codes: torch.Tensor, scale_and_zero: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (rows, in) @ W.T + bias with the kernel, W = (code - 8) * scale + zero per group of 32 inputs:
    codes uint8 (out, in / 2), two a byte, the even input in the low nibble; scale_and_zero bf16 (out, in / 32, 2).

    The operands are checked first, as in :func:`int8_linear`.
    """
    ops = checked_kernel(x, codes.shape[0], bias)
    expect(codes.dtype == torch.uint8 and codes.dim() == 2 and codes.is_contiguous(), f"codes must be a contiguous uint8 (out, in / 2) matrix, got {codes.dtype} {tuple(codes.shape)}")
    in_features = 2 * codes.shape[1]
    wanted = (codes.shape[0], in_features // BLOCK, 2)
    expect(scale_and_zero.dtype == torch.bfloat16 and tuple(scale_and_zero.shape) == wanted and scale_and_zero.is_contiguous(),
           f"scale_and_zero must be contiguous bfloat16 {wanted}, got {scale_and_zero.dtype} {tuple(scale_and_zero.shape)}")
    expect_inputs(ops, x, in_features, "int4")
    return ops.int4_linear(x, codes, scale_and_zero, bias)


def checked_kernel(x: torch.Tensor, out_features: int, bias: torch.Tensor | None) -> Any:
    """The kernel for this CPU, after the checks every operand set shares."""
    ops = kernel()
    expect(ops is not None, "the integer dot-product kernel is not available on this machine (see the warning when it was built)")
    expect(x.device.type == "cpu", f"the kernel runs on the CPU; x is on {x.device}")
    expect(x.dtype in ACTIVATION_DTYPES and x.dim() == 2 and x.is_contiguous(), f"x must be a contiguous (rows, in) float32, bfloat16 or float16 matrix, got {x.dtype} {tuple(x.shape)}")
    if bias is not None:
        expect(bias.dtype == x.dtype and bias.shape == (out_features,) and bias.is_contiguous(), f"bias must be a contiguous {x.dtype} vector of {out_features}, got {bias.dtype} {tuple(bias.shape)}")
    return ops


def expect_inputs(ops: Any, x: torch.Tensor, in_features: int, scheme: str) -> None:
    expect(x.shape[1] == in_features, f"x has {x.shape[1]} inputs, the weight {in_features}")
    step = step_bytes(ops) * (2 if scheme == "int4" else 1)
    expect(supports(ops, scheme, in_features), f"this build takes {scheme} layers whose inputs are a multiple of {step}, not {in_features}")


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)
