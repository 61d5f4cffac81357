"""Every fast path computes what the reference computes: CPULinear (bf16 storage, fp32 multiply),
the loading shortcuts, and the fast default model against HF transformers."""

import copy
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, hf_twin, random_model, tiny_config
from torch import nn

import minqwen
from minqwen import linear
from minqwen.linear import CPULinear, gemm_dtype, use_cpu_linears


@pytest.fixture(params=[False, True], ids=["avx2-like", "bf16-capable"])
def bf16_gemm(request, monkeypatch):
    """Run a test as on a CPU without (then with) fast bf16 GEMM."""
    monkeypatch.setattr(linear, "cpu_has_fast_bf16_gemm", lambda: request.param)
    return request.param


def test_gemm_dtype_widens_half_types_only_where_bf16_gemm_is_slow(bf16_gemm):
    assert gemm_dtype(torch.float32) == torch.float32
    expected = torch.bfloat16 if bf16_gemm else torch.float32
    assert gemm_dtype(torch.bfloat16) == expected
    assert gemm_dtype(torch.bfloat16, "meta") == torch.bfloat16  # only CPUs are widened


def test_cpu_has_fast_bf16_gemm_is_a_bool():
    assert isinstance(linear.cpu_has_fast_bf16_gemm(), bool)


def random_cpu_linear(bias: bool, dtype: torch.dtype) -> tuple[nn.Linear, CPULinear]:
    torch.manual_seed(0)
    plain = nn.Linear(48, 40, bias=bias).to(dtype)
    return plain, use_cpu_linears(nn.Sequential(copy.deepcopy(plain)))[0]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, 64])
def test_cpu_linear_bf16_equals_the_fp32_product_rounded(rows, bias, bf16_gemm):
    plain, fast = random_cpu_linear(bias, torch.bfloat16)
    x = torch.randn(2, rows, 48).to(torch.bfloat16)
    got = fast(x)
    assert got.dtype == torch.bfloat16 and got.shape == (2, rows, 40)
    if rows > 1 and not bf16_gemm:  # the widened path: exactly fp32 math, rounded once
        b = None if plain.bias is None else plain.bias.float()
        torch.testing.assert_close(got, F.linear(x.float(), plain.weight.float(), b).to(torch.bfloat16), rtol=0, atol=0)
    else:  # memory-bound rows, or a bf16-capable CPU: the plain layer, untouched
        torch.testing.assert_close(got, plain(x), rtol=0, atol=0)
    assert_close(got, plain(x), torch.bfloat16)  # and either way what a bf16 nn.Linear computes


def test_cpu_linear_fp32_is_nn_linear_bit_for_bit():
    plain, fast = random_cpu_linear(True, torch.float32)
    x = torch.randn(3, 64, 48)
    torch.testing.assert_close(fast(x), plain(x), rtol=0, atol=0)


def test_use_cpu_linears_changes_only_the_class():
    model = random_model(tiny_config())
    before = {k: v.data_ptr() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 257, (2, 9))
    with torch.no_grad():
        reference = model(ids)
        assert use_cpu_linears(model) is model
        after = model(ids)
    assert all(type(m) is not nn.Linear for m in model.modules())
    assert isinstance(model.model.layers[0].self_attn.q_proj, CPULinear)
    assert {k: v.data_ptr() for k, v in model.state_dict().items()} == before  # same tensors, same names
    torch.testing.assert_close(after, reference, rtol=0, atol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_fast_bf16_model_matches_the_plain_bf16_model_prefill_and_decode(tied, bf16_gemm):
    """The default fast configuration (bf16 weights, CPULinear) against plain nn.Linear layers."""
    plain = random_model(tiny_config(tied=tied, hidden_size=64, head_size=16)).to(torch.bfloat16)
    fast = use_cpu_linears(copy.deepcopy(plain))
    ids = torch.randint(0, 257, (2, 24))
    with torch.no_grad():
        assert_close(fast(ids), plain(ids), torch.bfloat16)
        cache = fast.make_cache(2, 25)
        fast(ids[:, :-1], cache=cache)  # prefill through the widened path ...
        step = fast(ids[:, -1:], cache=cache)  # ... then one decode step (memory-bound rows)
        assert_close(step, plain(ids)[:, -1:], torch.bfloat16)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_fast_bf16_model_close_to_hf(implementation, bf16_gemm):
    model = use_cpu_linears(random_model(tiny_config(4, 2), attn_implementation=implementation).bfloat16())
    hf = hf_twin(model, implementation)
    input_ids = torch.randint(0, 257, (2, 17))
    with torch.no_grad():
        assert_close(model(input_ids), hf(input_ids).logits, torch.bfloat16)


def test_from_pretrained_gives_cpu_linears(tmp_path, monkeypatch):
    monkeypatch.setenv(minqwen.hub.CACHE_ENV, str(tmp_path / "cache"))
    minqwen.save_pretrained(random_model(tiny_config()), tmp_path / "tiny")
    for dtype in (torch.float32, torch.bfloat16):
        model = minqwen.from_pretrained(tmp_path / "tiny", dtype=dtype)
        assert isinstance(model.lm_head, CPULinear) and model.lm_head.weight.dtype == dtype


def test_loading_does_not_import_dynamo(tmp_path):
    """Building the model on the meta device must not trigger random init or quantisation maths
    there (torch imports dynamo for those: seconds of load time)."""
    import subprocess

    minqwen.save_pretrained(random_model(tiny_config()), tmp_path / "tiny")
    code = (
        "import sys, minqwen; path = sys.argv[1]; minqwen.from_pretrained(path); "
        "minqwen.from_pretrained(path, dtype='bfloat16'); minqwen.from_pretrained(path, dtype='bfloat16', quantize='int8'); "
        "assert 'torch._dynamo' not in sys.modules, 'loading imported torch._dynamo'"
    )
    env = {**os.environ, minqwen.hub.CACHE_ENV: str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "tiny")], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
