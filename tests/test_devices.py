"""minqwen on every device this machine has, against the CPU, on tiny random models.

Each check runs once per device: "cpu" always, "cuda" and "mps" where PyTorch finds them (else
skipped with the reason). Models are built and randomised on the CPU, then copied to the device, so
both sides hold the very same weights; inputs are drawn on the CPU with a CPU generator. On "cpu"
the comparisons with the CPU are trivially equal, but the checks that stand alone still bite: a
cached decode equals a recomputed one, and a model built on "meta" moves to the device and runs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import random_model, tiny_config

import minqwen
from minqwen import lora
from minqwen.inspection import trace
from minqwen.loss import lm_loss
from minqwen.quant import INT8_KERNEL_ENV, Int8Linear, int8_kernel_available, quantize

DCA = {"chunk_size": 12, "local_size": 4, "original_max_position_embeddings": 16}  # chunks of 8 tokens
# Logits of the tiny models are O(1); devices sum in other orders, and bf16 keeps 8 bits of mantissa.
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.bfloat16: dict(rtol=3e-2, atol=6e-2)}


def accelerator_param(name: str, available: bool) -> pytest.param:
    reason = f"no {name} device here (torch {torch.__version__})"
    return pytest.param(name, marks=pytest.mark.skipif(not available, reason=reason))


DEVICES = [
    "cpu",
    accelerator_param("cuda", torch.cuda.is_available()),
    accelerator_param("mps", torch.backends.mps.is_available()),
]


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def ids_of(length: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 257, (batch, length), generator=torch.Generator().manual_seed(seed))


def on(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """A copy of ``model`` on ``device`` (the original stays on the CPU)."""
    return copy.deepcopy(model).to(device)


def assert_close_to_cpu(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
    torch.testing.assert_close(actual.cpu().float(), expected.cpu().float(), **TOLERANCE[dtype])


@torch.no_grad()
def cached_logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    """Logits of ``ids`` (batch, seq) from a prefill of ``prefill`` tokens, then one token at a time."""
    cache = model.make_cache(ids.shape[0], ids.shape[1])
    pieces = [model(ids[:, :prefill], cache=cache)]
    pieces += [model(ids[:, t : t + 1], cache=cache) for t in range(prefill, ids.shape[1])]
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_match_the_cpu(device, dtype):
    model = random_model(tiny_config()).to(dtype)
    ids = ids_of(13)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        expected = model(ids, attention_mask=mask)
        got = on(model, device)(ids.to(device), attention_mask=mask.to(device))
    assert got.device.type == device.type
    assert_close_to_cpu(got, expected, dtype)


@pytest.mark.parametrize("config", [{}, {"dual_chunk_attention_config": DCA}], ids=["plain", "dca"])
def test_cached_decode_equals_recomputed_and_the_cpu(device, config):
    model = random_model(tiny_config(**config))
    ids = ids_of(30)  # DCA: almost four chunks, so all three parts (intra, successive, inter) are used
    moved = on(model, device)
    assert moved.make_cache(2, 4).keys.device.type == device.type, "the cache lives on the model's device"
    with torch.no_grad():
        recomputed = moved(ids.to(device))
    assert_close_to_cpu(cached_logits(moved, ids.to(device), prefill=11), recomputed)
    with torch.no_grad():
        assert_close_to_cpu(recomputed, model(ids))


def test_greedy_ids_match_the_cpu(device):
    model = random_model(tiny_config())
    prompt = [3, 14, 15, 92, 65, 35]
    expected = minqwen.generate(model, prompt, max_new_tokens=8, stop_token_ids=[])
    assert minqwen.generate(on(model, device), prompt, max_new_tokens=8, stop_token_ids=[]) == expected


def test_seeded_sampling_repeats_on_the_device(device):
    model = on(random_model(tiny_config()), device)
    draws = [minqwen.generate(model, [1, 2, 3], max_new_tokens=8, stop_token_ids=[], temperature=1.0, seed=7) for _ in range(2)]
    assert draws[0] == draws[1]


def gradients(model, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    model.train()
    loss = lm_loss(model, ids)
    loss.backward()
    return {name: p.grad.cpu() for name, p in model.named_parameters() if p.grad is not None}


def test_training_step_gives_the_cpu_gradients(device):
    model = random_model(tiny_config())
    ids = ids_of(12)
    moved = on(model, device)
    expected, got = gradients(model, ids), gradients(moved, ids.to(device))
    assert got.keys() == expected.keys() and len(got) == len(list(model.parameters()))
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-5, msg=name)
    optimizer = torch.optim.AdamW(moved.parameters(), lr=1e-3)
    optimizer.step()  # the optimizer's state lives on the device too
    assert all(p.device.type == device.type for p in moved.parameters())


def test_lora_after_moving_trains_like_on_the_cpu(device):
    model = random_model(tiny_config())
    lora.apply(model, r=4, targets=("q_proj", "v_proj"))
    with torch.no_grad():
        for module in lora.adapted_modules(model).values():
            module.lora_B.normal_(generator=torch.Generator().manual_seed(1))  # B = 0 would hide the adapters
    ids = ids_of(10)
    moved = on(model, device)
    expected, got = gradients(model, ids), gradients(moved, ids.to(device))
    assert set(got) == {f"{name}.{ab}" for name in lora.adapted_modules(model) for ab in ("lora_A", "lora_B")}
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-3, atol=1e-5, msg=name)


def test_inspection_hooks_match_the_cpu(device):
    model = random_model(tiny_config())
    ids = ids_of(9)
    expected = trace(model, ids, attentions=True, capture=["model.layers.1.mlp"])
    got = trace(on(model, device), ids.to(device), attentions=True, capture=["model.layers.1.mlp"])
    for ours, theirs in zip([*got.hidden_states, *got.attentions], [*expected.hidden_states, *expected.attentions]):
        assert_close_to_cpu(ours, theirs)
    assert_close_to_cpu(got.activations["model.layers.1.mlp"], expected.activations["model.layers.1.mlp"])


def test_a_meta_built_model_loads_and_moves_to_the_device(device):
    reference = random_model(tiny_config())
    with torch.device("meta"):
        skeleton = minqwen.Qwen2ForCausalLM(reference.config)
    skeleton.load_state_dict(reference.state_dict(), assign=True)
    moved = skeleton.to(device).eval()
    assert {t.device.type for t in [*moved.parameters(), *moved.buffers()]} == {device.type}
    ids = ids_of(15)
    with torch.no_grad():
        assert_close_to_cpu(moved(ids.to(device)), reference(ids))
    assert_close_to_cpu(cached_logits(moved, ids.to(device), prefill=7), reference(ids).detach())


def test_int8_runs_where_there_is_a_kernel_and_says_so_where_there_is_none(device, monkeypatch):
    model = quantize(random_model(tiny_config(hidden_size=64, head_size=16)), "int8")
    ids = ids_of(5)
    monkeypatch.setenv(INT8_KERNEL_ENV, "dequant")  # plain torch: every device runs it
    with torch.no_grad():
        assert_close_to_cpu(on(model, device)(ids.to(device)), model(ids))
    monkeypatch.setenv(INT8_KERNEL_ENV, "fused")
    moved = on(model, device)
    if int8_kernel_available(device):
        layer = moved.model.layers[0].self_attn.q_proj
        assert isinstance(layer, Int8Linear) and layer.path(1) == "fused"
    else:
        with pytest.raises(ValueError, match=f"no int8 kernel for device '{device.type}'"):
            moved(ids.to(device))
