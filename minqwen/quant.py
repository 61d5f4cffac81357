"""Weight-only quantisation, int8 and int4: fewer bytes for every weight a token reads.

Decoding one token is a matrix-vector product per linear layer, so its speed is set by how many
bytes of weights come out of memory. Storing each weight as one signed byte with one scale per
output channel (row),

    W[o, :] ~= scale[o] * Q[o, :],   scale[o] = max|W[o, :]| / 127,   Q = round(W / scale) in [-127, 127],

halves what bf16 reads. It is "weight-only": activations stay in bf16 (or fp32), and the scale
is applied after the matrix product, ``y = (x @ Q.T) * scale``, which is exact algebra.

Three ways to compute it, picked per call by the number of rows (tokens) in ``x``:
- ``dot``, a few rows (decoding): minqwen's integer dot-product kernel (:mod:`minqwen.qdot`)
  quantises the activations to int8 per block of 32 and multiplies integers, never widening a
  weight -- the fastest path on CPUs with AVX2 or AVX-512, once it is compiled;
- ``fused``, a few rows where that kernel is missing: PyTorch's CPU kernel
  ``torch._weight_int8pack_mm`` reads the int8 matrix directly, with bf16 activations, but
  converts every weight to a float on the way (about half the memory's speed on two cores);
- ``dequant``, many rows (prefill): the int8 matrix is widened to the GEMM dtype once per call and
  goes through the ordinary matrix multiply, which is compute-bound there anyway.

``MINQWEN_INT8_KERNEL`` forces the path (read on every call): ``dot`` or ``fused`` runs that
kernel for every product whatever its rows (an error where it is missing; a layer whose shape or
alignment the kernel cannot take still widens), ``dequant`` always widens, ``auto`` (the default)
picks as above. On devices without the kernels (CUDA, MPS) ``auto`` widens for every product.

The embedding table stays in the model's dtype (a token reads one row of it, so int8 would save
memory but no time). The LM head is quantised too by default: at 151936 x 896 it is a quarter of
the bytes a token reads; ``lm_head=False`` keeps it in the model's dtype.

int4 halves the bytes again, with a scale *and a zero point* per group of ``group_size``
consecutive inputs of a row (one scale per row is too coarse at 16 levels):

    W[o, k] ~= (Q[o, k] - 8) * scale[o, g] + zero[o, g],   g = k // group_size,   Q in [0, 15].

The codes are stored two to a byte (``weight``: uint8 (out, in / 2), the even input in the low
nibble), the scales and zero points as one bf16 tensor (``weight_scale_and_zero``: (out,
in / group, 2)), so each row's bytes lie together: the integer dot-product kernel streams them
as stored. PyTorch's CPU kernel ``torch._weight_int4pack_mm_for_cpu`` (the ``fused`` path, where
that kernel is missing) wants the codes re-ordered for its vector width and the scales grouped
by column, so it gets copies of both, made on its first use (:meth:`Int4Linear.pack_for_kernel`);
the state dict keeps the layout above. ``MINQWEN_INT4_KERNEL=auto|dot|fused|dequant`` picks the
path like ``MINQWEN_INT8_KERNEL`` (``auto`` uses a kernel up to :data:`INT4_KERNEL_MAX_ROWS`
rows: widening int4 costs more than int8).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from . import qdot
from .linear import env_choice, gemm_dtype
from .model import is_skeleton

SCHEMES = ("int8", "int4")
INT8_MAX = 127
# Up to this many rows the int8 kernels are used; above, widen the weights and run a GEMM.
KERNEL_MAX_ROWS = 8
# The kernel steps through ``in_features`` 16 at a time with aligned vector loads (AVX-512):
# it needs in_features % 16 == 0 and operands starting on 64-byte boundaries.
KERNEL_BLOCK = 16
KERNEL_ALIGNMENT = 64
# Forces Int8Linear's path: "dot" (minqwen.qdot), "fused" (PyTorch's int8 kernel), "dequant"
# (widen, then an ordinary GEMM) or "auto".
INT8_KERNEL_ENV = "MINQWEN_INT8_KERNEL"
KERNEL_MODES = ("auto", "dot", "fused", "dequant")

# int4: 16 levels; the kernel's codes are unsigned and centred on 8.
INT4_LEVELS = 16
INT4_CENTER = 8
# Group sizes the CPU kernel takes. 32 is the default, chosen by measurement on the real 0.5B
# (mean next-token loss on the shipped text, 3 x 1024 tokens, through PyTorch's int4 kernel; README): +2.2 % over bf16 at 5 bits
# a weight (4 + a bf16 scale and zero per 32), where 64 gives +2.9 % at 4.5 bits, too close to
# the 3 % bound.
INT4_GROUP_SIZES = (32, 64, 128, 256)
INT4_GROUP_SIZE = 32
# The grid steps tried per group: (max - min) / 15, / 14, ... (see quantize_int4).
INT4_GRID_STEPS = (15, 14, 13, 12)
# The int4 kernel works on blocks of 16 output rows at least.
INT4_KERNEL_ROWS_MULTIPLE = 16
# Up to this many rows (tokens) ``auto`` runs the int4 kernel. Its alternative widens the whole
# matrix on every call, so the kernel wins far beyond decoding: on the 2-core AVX-512 EPYC (busy,
# so roughly) a (4864 x 896) product took 19 vs 146 ms at 64 rows, 120 vs 189 ms at 512 and was
# even at 1024.
INT4_KERNEL_MAX_ROWS = 512
INT4_KERNEL_ENV = "MINQWEN_INT4_KERNEL"


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: weight (out, in) float -> (Q int8 (out, in), scale fp32 (out,)).

    All-zero rows get scale 1 (Q is 0 there), so dequantising never divides by zero.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_int8 needs a 2-D floating-point weight, got {weight.dtype} {tuple(weight.shape)}")
    weight = weight.detach().float()
    absmax = weight.abs().amax(dim=1)  # (out,)
    scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))
    q = torch.round(weight / scale[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q.contiguous(), scale  # row-major whatever the input's layout: the kernel reads rows


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float matrix an int8 weight stands for: ``scale[:, None] * Q`` in ``dtype``."""
    return (q.float() * scale.float()[:, None]).to(dtype)


def int8_kernel_available(device: torch.device) -> bool:
    """Whether the fused int8 x bf16 matrix kernel can run on ``device`` (CPU builds of PyTorch have it)."""
    return device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm")


def kernel_mode(env: str, scheme: str, available: bool, device: torch.device, kernel: str) -> str:
    """``auto``, ``dot``, ``fused`` or ``dequant`` from environment variable ``env``; ``fused`` without PyTorch's kernel is a ``ValueError``."""
    mode = env_choice(env, KERNEL_MODES)
    if mode == "fused" and not available:
        raise ValueError(
            f"{env}=fused, but there is no {scheme} kernel for device {device.type!r} "
            f"(only CPU builds of PyTorch have {kernel}); use dot, dequant or auto"
        )
    return mode


def aligned(tensor: torch.Tensor, alignment: int = KERNEL_ALIGNMENT) -> torch.Tensor:
    """``tensor`` if its data starts on an ``alignment``-byte boundary, else an aligned copy."""
    return tensor if tensor.data_ptr() % alignment == 0 else tensor.clone()


class QuantizedLinear(nn.Module):
    """What :class:`Int8Linear` and :class:`Int4Linear` share: ``nn.Linear``'s interface, a float
    bias, and two ways to multiply, the fused kernel (:meth:`_fused`, a few rows) or an ordinary
    GEMM on the widened weight (:meth:`_widened`); :meth:`uses_kernel` picks one per call."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device: torch.device | str | None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None
        self._paths: dict[tuple, str] = {}  # path(rows)'s decisions

    def copy_bias(self, linear: nn.Linear) -> None:
        """Take ``linear``'s bias (if any) as it is: only the weight is quantised."""
        if linear.bias is not None:
            self.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out)
        rows = x.reshape(-1, self.in_features)  # (rows, in)
        path = self.path(rows.shape[0])
        if path == "dot":  # one call: the kernel adds the bias and returns x's dtype
            bias = self.bias if self.bias is None or self.bias.dtype == x.dtype else self.bias.to(x.dtype)
            return self._dot(rows.contiguous(), bias).view(*x.shape[:-1], self.out_features)
        out = self._fused(rows) if path == "fused" else self._widened(rows)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def path(self, rows: int) -> str:
        """How a product with ``rows`` rows runs: ``"dot"``, ``"fused"`` or ``"dequant"`` (see the module docstring).

        ``auto`` takes the integer dot-product kernel for up to :attr:`dot_max_rows` rows, else
        PyTorch's kernel up to :attr:`fused_max_rows`, else widens. ``dot`` and ``fused`` force
        their kernel (an error where it is missing; a layer it cannot take still widens).

        Decided once per setting and remembered: a decode step calls some 170 layers, and
        working it out each time cost more than the kernel itself on the small ones. The key holds
        everything the answer depends on: the two switches, the row-count thresholds and the
        weight's storage (replaced or moved weights are decided afresh).
        """
        key = (os.environ.get(self.kernel_env), os.environ.get(qdot.ISA_ENV), rows <= self.dot_max_rows, rows <= self.fused_max_rows, self.weight.data_ptr())
        chosen = self._paths.get(key)
        if chosen is None:
            if len(self._paths) > 64:  # weights swapped many times: forget the old ones
                self._paths.clear()
            chosen = self._paths[key] = self.choose_path(rows)
        return chosen

    def choose_path(self, rows: int) -> str:
        """:meth:`path` worked out (``ValueError`` for a switch that names a missing kernel)."""
        mode = self.mode()
        if mode in ("auto", "dot"):
            if self.dot_ready(mode) and (mode == "dot" or rows <= self.dot_max_rows):
                return "dot"
            if mode == "dot":
                return "dequant"
        if mode != "dequant" and self.kernel_ready() and (mode == "fused" or rows <= self.fused_max_rows):
            return "fused"
        return "dequant"

    def dot_ready(self, mode: str = "auto") -> bool:
        """Whether :meth:`_dot` may run: the kernel is built for this CPU and takes this layer's shape.

        With ``mode="dot"`` a missing kernel (a GPU, or no compiler) is a ``ValueError``.
        """
        device = self.weight.device
        ops = qdot.kernel() if device.type == "cpu" else None
        if ops is None and mode == "dot":
            where = "on this CPU (see the warning above)" if device.type == "cpu" else f"on device {device.type!r} (CPUs only)"
            raise ValueError(f"{self.kernel_env}=dot, but the integer dot-product kernel is not available {where}; use fused, dequant or auto")
        return ops is not None and qdot.supports(ops, self.scheme, self.in_features, self.group_size)

    def mode(self) -> str:
        raise NotImplementedError

    def kernel_ready(self) -> bool:
        raise NotImplementedError

    def _dot(self, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def _fused(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _widened(self, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(QuantizedLinear):
    """A drop-in for ``nn.Linear`` holding int8 weights (out, in) and fp32 per-row scales.

    State-dict names follow the layer's: ``weight`` (int8), ``weight_scale`` (fp32) and ``bias``.
    Activations keep their dtype: the output has the dtype of the input.
    """

    scheme = "int8"
    group_size = qdot.BLOCK  # the dot kernel's activation blocks (the weight has one scale per row)
    kernel_env = INT8_KERNEL_ENV
    dot_max_rows = fused_max_rows = KERNEL_MAX_ROWS

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__(in_features, out_features, bias, dtype, device)
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantise an ``nn.Linear``; the bias (if any) keeps the linear's dtype."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.dtype, weight.device)
        if is_skeleton(weight):
            return layer
        layer.weight, layer.weight_scale = quantize_int8(weight)
        layer.copy_bias(linear)
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) float matrix this layer multiplies by."""
        return dequantize_int8(self.weight, self.weight_scale, dtype)

    def mode(self) -> str:
        """``MINQWEN_INT8_KERNEL``, checked (``fused`` where PyTorch's kernel is missing is a ``ValueError``)."""
        return kernel_mode(INT8_KERNEL_ENV, "int8", int8_kernel_available(self.weight.device), self.weight.device, "torch._weight_int8pack_mm")

    def kernel_ready(self) -> bool:
        """Whether :meth:`_fused` may run: a CPU with the kernel, a multiple of 16 inputs, aligned weights."""
        return (
            int8_kernel_available(self.weight.device)
            and self.in_features % KERNEL_BLOCK == 0
            and self.weight.data_ptr() % KERNEL_ALIGNMENT == 0
        )

    def _dot(self, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """(rows, in) -> (rows, out) + bias with the integer dot-product kernel, in rows' dtype."""
        return qdot.kernel().int8_linear(rows, self.weight, self.weight_scale, bias)

    def _fused(self, rows: torch.Tensor) -> torch.Tensor:
        """(rows, in) -> (rows, out) with PyTorch's int8 kernel, activations in bf16."""
        activations = aligned(rows.to(torch.bfloat16).contiguous())
        return torch._weight_int8pack_mm(activations, self.weight, self.weight_scale.to(torch.bfloat16))

    def _widened(self, rows: torch.Tensor) -> torch.Tensor:
        """(rows, in) -> (rows, out) through an ordinary GEMM: widen Q, multiply, then scale the columns."""
        dtype = gemm_dtype(rows.dtype, rows.device)
        return F.linear(rows.to(dtype), self.weight.to(dtype)) * self.weight_scale.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


# --------------------------------------------------------------------------- int4
def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric int4: weight (out, in) float -> (codes uint8 (out, in) in [0, 15], scale_and_zero bf16 (out, in/group, 2)).

    Each group of ``group_size`` inputs of a row is mapped onto 16 evenly spaced levels
    ``(Q - 8) * scale + zero``. The obvious grid spreads [min, max] over all 16 (``scale =
    (max - min) / 15``), but a slightly wider step anchored at the min or the max often fits the
    group's values better, so :data:`INT4_GRID_STEPS` candidates are tried per group and the one
    with the least squared error kept (llama.cpp searches its k-quant grids the same way). Scale
    and zero are rounded to bf16 *before* the codes are chosen: they are what the kernel uses.
    """
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_int4 needs a 2-D floating-point weight, got {weight.dtype} {tuple(weight.shape)}")
    if group_size not in INT4_GROUP_SIZES or weight.shape[1] % group_size:
        raise ValueError(
            f"int4 groups: group_size must be one of {INT4_GROUP_SIZES} and divide in_features; "
            f"got group_size={group_size} for a weight of shape {tuple(weight.shape)}"
        )
    out_features, in_features = weight.shape
    groups = weight.detach().float().reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=2, keepdim=True), groups.amax(dim=2, keepdim=True)  # (out, groups, 1)
    flat = high == low  # a constant group: any positive scale reproduces it
    best = None
    for steps in INT4_GRID_STEPS:
        scale = torch.where(flat, low.abs().clamp_min(1.0e-8), (high - low) / steps).bfloat16().float()
        for bottom in (low, high - (INT4_LEVELS - 1) * scale):  # the grid anchored at the min, then at the max
            candidate = int4_grid(groups, scale, (bottom + INT4_CENTER * scale).bfloat16().float())
            if best is None:
                best = candidate
            else:
                better = candidate[0] < best[0]
                best = tuple(torch.where(better, new, old) for new, old in zip(candidate, best))
    _, codes, scale, zero = best
    codes = codes.to(torch.uint8).reshape(out_features, in_features)
    scale_and_zero = torch.cat([scale, zero], dim=-1).to(torch.bfloat16).contiguous()  # (out, groups, 2)
    return codes, scale_and_zero


def int4_grid(groups: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The nearest codes on one grid per group, and its squared error: (error (out, groups, 1), codes, scale, zero)."""
    codes = (torch.round((groups - zero) / scale) + INT4_CENTER).clamp_(0, INT4_LEVELS - 1)
    error = ((codes - INT4_CENTER) * scale + zero - groups).square().sum(dim=2, keepdim=True)
    return error, codes, scale.expand_as(error), zero.expand_as(error)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Two 4-bit codes per byte: (out, in) uint8 in [0, 15] -> (out, in / 2), the even input in the low nibble."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_int4`: (out, in / 2) uint8 -> (out, in) codes in [0, 15]."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def dequantize_int4(packed: torch.Tensor, scale_and_zero: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float matrix an int4 weight stands for: ``(Q - 8) * scale + zero`` per group, in ``dtype``."""
    out_features, groups = scale_and_zero.shape[:2]
    codes = unpack_int4(packed).view(out_features, groups, -1).to(dtype)  # (out, groups, group_size)
    scale, zero = scale_and_zero.to(dtype).split(1, dim=-1)  # (out, groups, 1) each
    return ((codes - INT4_CENTER) * scale + zero).reshape(out_features, -1)


def int4_kernel_available(device: torch.device) -> bool:
    """Whether PyTorch's int4 x bf16 CPU kernel (and its weight packer) can run on ``device``."""
    return device.type == "cpu" and hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


class Int4Linear(QuantizedLinear):
    """A drop-in for ``nn.Linear`` holding group-wise int4 weights (see the module docstring).

    State-dict names follow the layer's: ``weight`` (uint8 (out, in / 2), two codes a byte),
    ``weight_scale_and_zero`` (bf16 (out, in / group_size, 2)) and ``bias``. PyTorch's kernel's
    own copies are derived from these (:meth:`pack_for_kernel`) and never saved.
    Activations keep their dtype: the output has the dtype of the input.
    """

    scheme = "int4"
    kernel_env = INT4_KERNEL_ENV
    # The dot kernel is slower than PyTorch's int4 kernel beyond a few rows (1.5x at 32-512), but
    # PyTorch's needs copies of the weights (+60 % of int4's memory), so with the dot kernel present
    # prefill uses it too and no copy is ever made.
    dot_max_rows = fused_max_rows = INT4_KERNEL_MAX_ROWS

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None, group_size: int = INT4_GROUP_SIZE,
    ) -> None:
        super().__init__(in_features, out_features, bias, dtype, device)
        self.group_size = group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device))
        groups = in_features // group_size
        self.register_buffer("weight_scale_and_zero", torch.zeros(out_features, groups, 2, dtype=torch.bfloat16, device=device))
        # PyTorch's kernel's copies: (source weight, its version, source scales, their version, codes, scales)
        self._kernel_copies: tuple | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = INT4_GROUP_SIZE) -> Int4Linear:
        """Quantise an ``nn.Linear``; the bias (if any) keeps the linear's dtype."""
        weight = linear.weight
        if group_size not in INT4_GROUP_SIZES or linear.in_features % group_size:
            raise ValueError(
                f"int4 needs in_features divisible by group_size (one of {INT4_GROUP_SIZES}); "
                f"got in_features={linear.in_features}, group_size={group_size}"
            )
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.dtype, weight.device, group_size)
        if is_skeleton(weight):
            return layer
        codes, layer.weight_scale_and_zero = quantize_int4(weight, group_size)
        layer.weight = pack_int4(codes)
        layer.copy_bias(linear)
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) float matrix this layer multiplies by."""
        return dequantize_int4(self.weight, self.weight_scale_and_zero, dtype)

    def mode(self) -> str:
        """``MINQWEN_INT4_KERNEL``, checked as for int8."""
        return kernel_mode(INT4_KERNEL_ENV, "int4", int4_kernel_available(self.weight.device), self.weight.device, "torch._weight_int4pack_mm_for_cpu")

    def kernel_ready(self) -> bool:
        """Whether :meth:`_fused` may run: a CPU with the kernel and a multiple of 16 output rows."""
        return int4_kernel_available(self.weight.device) and self.out_features % INT4_KERNEL_ROWS_MULTIPLE == 0

    def pack_for_kernel(self) -> tuple[torch.Tensor, torch.Tensor]:
        """PyTorch's kernel's operands: the codes re-ordered for its vector width and the scales as
        (in / group_size, out, 2). Made on first use, and again only when the weights change."""
        sources = (self.weight, self.weight._version, self.weight_scale_and_zero, self.weight_scale_and_zero._version)
        cached = self._kernel_copies
        if cached is None or any(a is not b if isinstance(a, torch.Tensor) else a != b for a, b in zip(cached, sources)):
            codes = unpack_int4(self.weight).to(torch.int32)  # (out, in)
            packed = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
            cached = (*sources, packed, self.weight_scale_and_zero.transpose(0, 1).contiguous())
            self._kernel_copies = cached
        return cached[4], cached[5]

    def _dot(self, rows: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """(rows, in) -> (rows, out) + bias with the integer dot-product kernel, in rows' dtype."""
        return qdot.kernel().int4_linear(rows, self.weight, self.weight_scale_and_zero, bias)

    def _fused(self, rows: torch.Tensor) -> torch.Tensor:
        """(rows, in) -> (rows, out) with PyTorch's int4 kernel, activations in bf16."""
        codes, scale_and_zero = self.pack_for_kernel()
        return torch._weight_int4pack_mm_for_cpu(rows.to(torch.bfloat16).contiguous(), codes, self.group_size, scale_and_zero)

    def _widened(self, rows: torch.Tensor) -> torch.Tensor:
        """(rows, in) -> (rows, out) through an ordinary GEMM on the dequantised weight."""
        dtype = gemm_dtype(rows.dtype, rows.device)
        return F.linear(rows.to(dtype), self.dequantize(dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int4, group_size={self.group_size}"


def scheme_tag(scheme: str) -> str:
    """The scheme with what fixes its stored layout: ``"int8"``, ``"int4g32r"`` (names prepared copies).

    ``r``: the scales are stored row by row, (out, in / 32, 2); copies of the earlier
    (in / 32, out, 2) layout were named ``int4g32`` and are simply not used any more.
    """
    return f"{scheme}g{INT4_GROUP_SIZE}r" if scheme == "int4" else scheme


QUANTIZED_LINEARS = (Int8Linear, Int4Linear)


def quantize(model: nn.Module, scheme: str = "int8", lm_head: bool = True, group_size: int = INT4_GROUP_SIZE) -> nn.Module:
    """Replace the model's linear layers by int8 (or int4) ones, in place; returns the model.

    Every ``nn.Linear`` inside the decoder layers is quantised, and the LM head unless
    ``lm_head=False`` (a head tied to the embedding is never quantised: the table is shared).
    Quantise a bf16 (or fp32) model; the activations keep the model's dtype. ``group_size``
    is int4's (inputs per scale and zero point).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; supported: {', '.join(SCHEMES)}")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full_name = f"{name}.{child_name}".lstrip(".")
            if isinstance(child, nn.Linear) and should_quantize(model, full_name, lm_head):
                setattr(module, child_name, quantized_linear(child, scheme, group_size, full_name))
    model.quantization = scheme
    return model


def quantized_linear(linear: nn.Linear, scheme: str, group_size: int, name: str) -> nn.Module:
    """``linear`` as an :class:`Int8Linear` or :class:`Int4Linear`; a layer int4 cannot group is a ``ValueError`` naming it."""
    if scheme == "int8":
        return Int8Linear.from_linear(linear)
    try:
        return Int4Linear.from_linear(linear, group_size)
    except ValueError as e:
        raise ValueError(f"cannot quantise {name} to int4: {e}") from None


def should_quantize(model: nn.Module, name: str, lm_head: bool) -> bool:
    """Decoder-layer linears always; the head if asked and not tied to the embedding table."""
    if name != "lm_head":
        return True
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    return lm_head and not tied
