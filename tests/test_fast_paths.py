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
from minqwen.loading.weights import load_hf_dir
from minqwen.linear import CPULinear, gemm_dtype, use_cpu_linears


@pytest.fixture(params=["fp32", "native"], ids=["widened (avx2-like)", "native bf16"])
def bf16_gemm(request, monkeypatch):
    """Run a test on each CPULinear path, forced with MINQWEN_BF16_GEMM whatever this CPU has.

    Returns True for the native bf16 path."""
    monkeypatch.setenv(linear.BF16_GEMM_ENV, request.param)
    return request.param == "native"


def test_gemm_dtype_widens_half_types_only_where_bf16_gemm_is_slow(bf16_gemm):
    assert gemm_dtype(torch.float32) == torch.float32
    expected = torch.bfloat16 if bf16_gemm else torch.float32
    assert gemm_dtype(torch.bfloat16) == expected
    assert gemm_dtype(torch.bfloat16, "meta") == torch.bfloat16  # only CPUs are widened


def test_bf16_gemm_auto_asks_the_cpu_and_bad_values_are_named(monkeypatch):
    monkeypatch.setenv(linear.BF16_GEMM_ENV, "auto")
    assert (gemm_dtype(torch.bfloat16) == torch.bfloat16) == linear.cpu_has_fast_bf16_gemm()
    monkeypatch.setattr(linear, "cpu_has_fast_bf16_gemm", lambda: False)
    assert gemm_dtype(torch.bfloat16) == torch.float32
    monkeypatch.setenv(linear.BF16_GEMM_ENV, "fast")
    with pytest.raises(ValueError, match="MINQWEN_BF16_GEMM='fast'.*auto, native, fp32"):
        gemm_dtype(torch.bfloat16)


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


def decode_logits(model, ids):
    """Prefill all but the last token into a cache, then decode the last one: (batch, 1, vocab)."""
    cache = model.make_cache(ids.shape[0], ids.shape[1])
    model(ids[:, :-1], cache=cache)
    return model(ids[:, -1:], cache=cache)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tied", [False, True])
def test_fast_bf16_model_is_as_accurate_as_the_plain_bf16_model(tied, seed, bf16_gemm):
    """The default fast configuration (bf16 weights, CPULinear) against the fp32 model, prefill and
    decode: its error is that of plain bf16 nn.Linear layers (the kernels round in other places)."""
    reference = random_model(tiny_config(tied=tied, hidden_size=64, head_size=16), seed=seed)
    plain = copy.deepcopy(reference).to(torch.bfloat16)
    fast = use_cpu_linears(copy.deepcopy(plain))
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for run in (lambda m: m(ids), lambda m: decode_logits(m, ids)):
            truth = run(reference)
            plain_error = (run(plain).float() - truth).abs().max().item()
            fast_error = (run(fast).float() - truth).abs().max().item()
            assert fast_error <= 1.5 * plain_error + 0.02, (fast_error, plain_error)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_fast_bf16_model_close_to_hf(implementation, bf16_gemm):
    model = use_cpu_linears(random_model(tiny_config(4, 2), attn_implementation=implementation).bfloat16())
    hf = hf_twin(model, implementation)
    input_ids = torch.randint(0, 257, (2, 17))
    with torch.no_grad():
        assert_close(model(input_ids), hf(input_ids).logits, torch.bfloat16)


def test_use_cpu_linears_keeps_bf16_layout_and_the_tie(bf16_gemm):
    model = random_model(tiny_config(tied=True)).to(torch.bfloat16)
    weights = {name: p for name, p in model.named_parameters()}
    use_cpu_linears(model)
    assert isinstance(model.model.layers[0].mlp.up_proj, CPULinear)
    assert all(p is weights[name] and p.is_contiguous() for name, p in model.named_parameters())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the tie survives


@pytest.mark.parametrize("rows", [1, 8])
def test_cpu_linear_decode_rows_still_train(rows, bf16_gemm):
    plain, fast = random_cpu_linear(True, torch.bfloat16)
    x = torch.randn(rows, 48).to(torch.bfloat16).requires_grad_()
    fast(x).float().sum().backward()
    assert fast.weight.grad is not None and x.grad.shape == x.shape


def test_from_pretrained_bf16_equals_the_plain_load(tmp_path, monkeypatch, bf16_gemm):
    monkeypatch.setenv(minqwen.hub.CACHE_ENV, str(tmp_path / "cache"))
    original = random_model(tiny_config(hidden_size=64, head_size=16))
    minqwen.save_pretrained(original, tmp_path / "tiny")
    model = minqwen.from_pretrained(tmp_path / "tiny", dtype=torch.bfloat16)
    variants = [p.name.split(".")[1] for p in (tmp_path / "cache" / "prepared").rglob("*.safetensors")]
    assert variants == ["bfloat16"]
    assert set(model.state_dict()) == set(original.state_dict())
    reference = load_hf_dir(tmp_path / "tiny", torch.bfloat16)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    ids = torch.randint(0, 257, (1, 12))
    with torch.no_grad():
        assert_close(model(ids), reference(ids), torch.bfloat16)
        assert minqwen.generate(model, ids[0], 5, stop_token_ids=[]) == minqwen.generate(reference, ids[0], 5, stop_token_ids=[])


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
