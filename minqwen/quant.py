"""int8 weight-only quantisation: half the bytes of bf16 for every weight a token reads.

Decoding one token is a matrix-vector product per linear layer, so its speed is set by how many
bytes of weights come out of memory. Storing each weight as one signed byte with one scale per
output channel (row),

    W[o, :] ~= scale[o] * Q[o, :],   scale[o] = max|W[o, :]| / 127,   Q = round(W / scale) in [-127, 127],

halves what bf16 reads. It is "weight-only": activations stay in bf16 (or fp32), and the scale
is applied after the matrix product, ``y = (x @ Q.T) * scale``, which is exact algebra.

Two ways to compute it, picked by the number of rows (tokens) in ``x``:
- a few rows (decoding): PyTorch's fused CPU kernel ``torch._weight_int8pack_mm`` reads the int8
  matrix directly, with bf16 activations (its fp32-activation path is several times slower);
- many rows (prefill): the int8 matrix is widened to the GEMM dtype once per call and goes
  through the ordinary matrix multiply, which is compute-bound there anyway.

``MINQWEN_INT8_KERNEL`` forces the path (read on every call): ``fused`` runs the kernel for every
product whatever its rows (an error on a device without it; a layer whose shape or alignment the
kernel cannot take still widens), ``dequant`` always widens, ``auto`` (the default) picks by rows
as above. On devices without the kernel (CUDA, MPS) ``auto`` widens for every product.

The embedding table stays in the model's dtype (a token reads one row of it, so int8 would save
memory but no time). The LM head is quantised too by default: at 151936 x 896 it is a quarter of
the bytes a token reads; ``lm_head=False`` keeps it in the model's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .linear import env_choice, gemm_dtype
from .model import is_skeleton

SCHEMES = ("int8",)
INT8_MAX = 127
# Up to this many rows the fused int8 kernel is used; above, widen the weights and run a GEMM.
KERNEL_MAX_ROWS = 8
# The kernel steps through ``in_features`` 16 at a time with aligned vector loads (AVX-512):
# it needs in_features % 16 == 0 and operands starting on 64-byte boundaries.
KERNEL_BLOCK = 16
KERNEL_ALIGNMENT = 64
# Forces Int8Linear's path: "fused" (the int8 kernel), "dequant" (widen, then an ordinary GEMM) or "auto".
INT8_KERNEL_ENV = "MINQWEN_INT8_KERNEL"
INT8_KERNEL_MODES = ("auto", "fused", "dequant")


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


def aligned(tensor: torch.Tensor, alignment: int = KERNEL_ALIGNMENT) -> torch.Tensor:
    """``tensor`` if its data starts on an ``alignment``-byte boundary, else an aligned copy."""
    return tensor if tensor.data_ptr() % alignment == 0 else tensor.clone()


class Int8Linear(nn.Module):
    """A drop-in for ``nn.Linear`` holding int8 weights (out, in) and fp32 per-row scales.

    State-dict names follow the layer's: ``weight`` (int8), ``weight_scale`` (fp32) and ``bias``.
    Activations keep their dtype: the output has the dtype of the input.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Quantise an ``nn.Linear``; the bias (if any) keeps the linear's dtype."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.dtype, weight.device)
        if is_skeleton(weight):
            return layer
        layer.weight, layer.weight_scale = quantize_int8(weight)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) float matrix this layer multiplies by."""
        return dequantize_int8(self.weight, self.weight_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out)
        rows = x.reshape(-1, self.in_features)  # (rows, in)
        out = self._fused(rows) if self.uses_kernel(rows.shape[0]) else self._widened(rows)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.to(x.dtype).view(*x.shape[:-1], self.out_features)

    def uses_kernel(self, rows: int) -> bool:
        """Whether a product with ``rows`` rows runs the fused kernel (``MINQWEN_INT8_KERNEL`` decides, see above)."""
        mode = env_choice(INT8_KERNEL_ENV, INT8_KERNEL_MODES)
        if mode == "fused" and not int8_kernel_available(self.weight.device):
            raise ValueError(
                f"{INT8_KERNEL_ENV}=fused, but there is no int8 kernel for device {self.weight.device.type!r} "
                "(only CPU builds of PyTorch have torch._weight_int8pack_mm); use dequant or auto"
            )
        return mode != "dequant" and (mode == "fused" or rows <= KERNEL_MAX_ROWS) and self.kernel_ready()

    def kernel_ready(self) -> bool:
        """Whether :meth:`_fused` may run: a CPU with the kernel, a multiple of 16 inputs, aligned weights."""
        return (
            int8_kernel_available(self.weight.device)
            and self.in_features % KERNEL_BLOCK == 0
            and self.weight.data_ptr() % KERNEL_ALIGNMENT == 0
        )

    def _fused(self, rows: torch.Tensor) -> torch.Tensor:
        """(rows, in) -> (rows, out) with the int8 kernel, activations in bf16."""
        activations = aligned(rows.to(torch.bfloat16).contiguous())
        return torch._weight_int8pack_mm(activations, self.weight, self.weight_scale.to(torch.bfloat16))

    def _widened(self, rows: torch.Tensor) -> torch.Tensor:
        """(rows, in) -> (rows, out) through an ordinary GEMM: widen Q, multiply, then scale the columns."""
        dtype = gemm_dtype(rows.dtype, rows.device)
        return F.linear(rows.to(dtype), self.weight.to(dtype)) * self.weight_scale.to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, int8"


def quantize(model: nn.Module, scheme: str = "int8", lm_head: bool = True) -> nn.Module:
    """Replace the model's linear layers by int8 ones, in place; returns the model.

    Every ``nn.Linear`` inside the decoder layers is quantised, and the LM head unless
    ``lm_head=False`` (a head tied to the embedding is never quantised: the table is shared).
    Quantise a bf16 (or fp32) model; the activations keep the model's dtype.
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown quantization scheme {scheme!r}; supported: {', '.join(SCHEMES)}")
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and should_quantize(model, f"{name}.{child_name}".lstrip("."), lm_head):
                setattr(module, child_name, Int8Linear.from_linear(child))
    model.quantization = scheme
    return model


def should_quantize(model: nn.Module, name: str, lm_head: bool) -> bool:
    """Decoder-layer linears always; the head if asked and not tied to the embedding table."""
    if name != "lm_head":
        return True
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    return lm_head and not tied
