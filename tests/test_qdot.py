"""The integer dot-product kernel (minqwen/csrc/qdot.cpp) against its PyTorch twin (minqwen.qdot).

Each build this CPU can run (AVX-512 VNNI, AVX2) is compared with the reference on int8 and int4
weights, every activation dtype, one and several rows, with and without a bias. Both compute the
same integer sums, so they agree to fp32 rounding; the reference in turn is checked against the
exact product within the error that quantising the activations may add.
"""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch
import torch.nn.functional as F

from minqwen import qdot
from minqwen.quant import INT8_KERNEL_ENV, Int4Linear, Int8Linear, dequantize_int4, pack_int4, quantize_int4, quantize_int8

HAS_COMPILER = shutil.which("c++") is not None


def isa_param(isa: str) -> pytest.param:
    missing = set(qdot.ISA_CPU_FLAGS[isa]) - qdot.cpu_flags()
    reason = f"this CPU lacks {sorted(missing)}" if missing else "no C++ compiler on PATH"
    return pytest.param(isa, marks=pytest.mark.skipif(bool(missing) or not HAS_COMPILER, reason=reason))


@pytest.fixture(params=[isa_param(isa) for isa in qdot.ISA_CPU_FLAGS])
def ops(request):
    """The kernel's operators for one build; a build that fails here is a failure, not a skip."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        return qdot.kernel(request.param)


def random_weights(out_features: int, in_features: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=generator) * torch.logspace(-2, 0, out_features)[:, None]


def activations(rows: int, in_features: int, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, in_features, generator=generator)
    x[:, 5] *= 40  # an outlier channel, as real activations have: its block gets a coarse scale
    x[0, 64:96] = 0  # an all-zero block
    return x.to(dtype)


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_kernel_equals_the_reference(ops, dtype, rows, bias):
    weight, scale = quantize_int8(random_weights(96, 256))
    x = activations(rows, 256, dtype)
    b = torch.randn(96).to(dtype) if bias else None
    got, expected = ops.int8_linear(x, weight, scale, b), qdot.int8_linear_reference(x, weight, scale, b)
    assert got.shape == (rows, 96) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), **close_in(dtype, expected))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_int4_kernel_equals_the_reference(ops, dtype, rows, bias):
    codes, scale_and_zero = quantize_int4(random_weights(48, 256), 32)
    packed = pack_int4(codes)
    x = activations(rows, 256, dtype)
    b = torch.randn(48).to(dtype) if bias else None
    got, expected = ops.int4_linear(x, packed, scale_and_zero, b), qdot.int4_linear_reference(x, packed, scale_and_zero, b)
    assert got.shape == (rows, 48) and got.dtype == dtype
    torch.testing.assert_close(got.float(), expected.float(), **close_in(dtype, expected))


def close_in(dtype: torch.dtype, expected: torch.Tensor) -> dict:
    """fp32: summation order only; half types: one rounding of the output."""
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    return dict(rtol=1e-2, atol=1e-2 * expected.abs().max().item())


def activation_error_bound(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """|y_quantised - y_exact| <= sum_k |W[o, k]| * d(k) / 2: each activation moves by at most half its block's step."""
    _, d = qdot.quantize_activations(x)  # (rows, blocks, 1)
    half_steps = (d / 2).expand(-1, -1, qdot.BLOCK).reshape(x.shape)  # (rows, in)
    return half_steps @ weight.abs().T.double().float()


def test_quantised_activations_round_to_the_nearest_step():
    x = activations(2, 128, torch.float32)
    q, d = qdot.quantize_activations(x)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127  # every non-zero block uses the full range
    error = (q.float() * d - x.view(2, -1, 32)).abs()
    assert (error <= d / 2 + 1e-7).all()
    assert (q[0, 2] == 0).all() and d[0, 2] == 0  # the zero block stays exactly zero


def test_reference_is_the_exact_product_up_to_the_activations_rounding():
    torch.manual_seed(0)
    x = activations(3, 256, torch.float32)
    weight, scale = quantize_int8(random_weights(64, 256))
    exact = F.linear(x.double(), weight.double() * scale.double()[:, None]).float()
    bound = activation_error_bound(x, weight.float() * scale[:, None])
    assert ((qdot.int8_linear_reference(x, weight, scale) - exact).abs() <= bound + 1e-5).all()
    codes, scale_and_zero = quantize_int4(random_weights(64, 256), 32)
    dequantized = dequantize_int4(pack_int4(codes), scale_and_zero)
    exact = F.linear(x.double(), dequantized.double()).float()
    got = qdot.int4_linear_reference(x, pack_int4(codes), scale_and_zero)
    assert ((got - exact).abs() <= activation_error_bound(x, dequantized) + 1e-5).all()
    assert (got - exact).abs().max() > 0, "the activations are rounded: the comparison must not be trivially exact"


def test_bad_operands_are_named_before_the_kernel_runs():
    if qdot.kernel() is None:
        pytest.skip("no integer dot-product kernel on this machine (see the warning)")
    weight, scale = quantize_int8(random_weights(16, 256))
    x = torch.randn(1, 256)
    for call, match in [
        (lambda: qdot.int8_linear(torch.randn(1, 128), weight, scale), "x has 128 inputs, the weight 256"),
        (lambda: qdot.int8_linear(x.double(), weight, scale), "x must be a contiguous .* float32, bfloat16 or float16"),
        (lambda: qdot.int8_linear(x, weight.float(), scale), "weight must be a contiguous int8"),
        (lambda: qdot.int8_linear(x, weight, scale[:8]), "scale must be a contiguous float32 vector of 16"),
        (lambda: qdot.int8_linear(x, weight, scale, torch.zeros(16).bfloat16()), "bias must be a contiguous torch.float32 vector of 16"),
        (lambda: qdot.int8_linear(torch.randn(1, 40), weight[:, :40].contiguous(), scale), "inputs are a multiple of"),
        (lambda: qdot.int4_linear(x, torch.zeros(16, 128, dtype=torch.uint8), torch.zeros(8, 16, 2, dtype=torch.bfloat16)), r"scale_and_zero must be contiguous bfloat16 \(16, 8, 2\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
    torch.testing.assert_close(qdot.int8_linear(x, weight, scale), qdot.int8_linear_reference(x, weight, scale), rtol=1e-5, atol=1e-4)


def test_layers_use_the_kernel_for_decoding_and_match_the_reference(monkeypatch):
    if qdot.kernel() is None:
        pytest.skip("no integer dot-product kernel on this machine (see the warning)")
    linear = torch.nn.Linear(256, 64).to(torch.bfloat16)
    x = torch.randn(2, 256).to(torch.bfloat16)
    int8 = Int8Linear.from_linear(linear)
    assert int8.path(1) == "dot" and int8.path(9) == "dequant"  # prefill widens
    torch.testing.assert_close(int8(x), qdot.int8_linear_reference(x, int8.weight, int8.weight_scale, int8.bias), rtol=1e-2, atol=1e-2)
    int4 = Int4Linear.from_linear(linear, group_size=32)
    assert int4.path(1) == "dot" and int4.path(64) == "dot" and int4._kernel_copies is None  # no copy of the weights for PyTorch's kernel
    expected = qdot.int4_linear_reference(x, int4.weight, int4.weight_scale_and_zero, int4.bias)
    torch.testing.assert_close(int4(x), expected, rtol=1e-2, atol=1e-2)


def test_a_failed_build_warns_once_and_the_layers_fall_back(monkeypatch):
    def no_compiler(isa):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(qdot, "build_and_load", no_compiler)
    qdot.load_kernel.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match=r"integer-dot kernel \(avx2\) is unavailable.*c\+\+: command not found"):
            assert qdot.kernel("avx2") is None
        monkeypatch.setenv(qdot.ISA_ENV, "avx2")
        layer = Int8Linear.from_linear(torch.nn.Linear(256, 64))
        assert layer.path(1) in ("fused", "dequant")
        monkeypatch.setenv(INT8_KERNEL_ENV, "dot")
        with pytest.raises(ValueError, match="MINQWEN_INT8_KERNEL=dot, but the integer dot-product kernel is not available on this CPU"):
            layer(torch.randn(1, 256))
    finally:
        qdot.load_kernel.cache_clear()  # the next test builds (or loads) the real kernel again


def test_isa_switch(monkeypatch):
    monkeypatch.setenv(qdot.ISA_ENV, "avx-9000")
    with pytest.raises(ValueError, match="MINQWEN_QDOT_ISA='avx-9000'"):
        qdot.cpu_isa()
    monkeypatch.setattr(qdot, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    monkeypatch.setenv(qdot.ISA_ENV, "avx512_vnni")
    with pytest.raises(ValueError, match="this CPU lacks"):
        qdot.cpu_isa()
    monkeypatch.setenv(qdot.ISA_ENV, "auto")
    assert qdot.cpu_isa() == "avx2"
    monkeypatch.setattr(qdot, "cpu_flags", lambda: frozenset({"neon"}))
    assert qdot.cpu_isa() is None
    with pytest.warns(RuntimeWarning, match="neither AVX-512 VNNI nor AVX2"):
        assert qdot.kernel() is None  # neither build runs here: PyTorch's kernels, said once
