"""LoRA: zero-initialised adapters change nothing, merging is exact, save/load round trips, only adapters train."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import assert_exercise_check, random_model, tiny_config

from minqwen import lora
from minqwen.exercises import check_exercise_lora_merge
from minqwen.loss import lm_loss
from minqwen.lora import LoRALinear


def sample_ids(vocab_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, 10), generator=torch.Generator().manual_seed(seed))


def randomize_adapters_(model: torch.nn.Module, seed: int = 1) -> None:
    """Give B non-zero values, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora.adapted_modules(model).values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.1)


def test_zero_initialised_adapters_leave_logits_unchanged() -> None:
    model = random_model(tiny_config())
    ids = sample_ids(model.config.vocab_size)
    with torch.no_grad():
        before = model(ids)
        names = lora.apply(model, r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj"))
        after = model(ids)
    assert names == [f"model.layers.{i}.{part}" for i in range(2) for part in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")]
    assert torch.equal(before, after)


def test_only_adapters_are_trainable_and_receive_gradients() -> None:
    model = random_model(tiny_config())
    lora.apply(model, r=4, targets=("q_proj", "v_proj"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"model.layers.{i}.self_attn.{proj}.lora_{ab}" for i in range(2) for proj in ("q_proj", "v_proj") for ab in "AB"}
    per_layer = (4 * 32 + 32 * 4) + (4 * 32 + 16 * 4)  # q_proj: A (r, in) + B (out, r); v_proj has 2 KV heads
    assert sum(p.numel() for p in lora.trainable_parameters(model)) == 2 * per_layer
    lm_loss(model, sample_ids(model.config.vocab_size)).backward()
    assert all(p.grad is not None for p in lora.trainable_parameters(model))
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_lora_linear_computes_base_plus_scaled_low_rank_update() -> None:
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5)
    layer = LoRALinear(base, r=2, alpha=6)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 6)
    expected = x @ base.weight.T + base.bias + 3.0 * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.delta_weight(), 3.0 * layer.lora_B @ layer.lora_A)


def test_merged_model_equals_adapter_model() -> None:
    model = random_model(tiny_config())
    lora.apply(model, r=4, alpha=16, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    randomize_adapters_(model)
    ids = sample_ids(model.config.vocab_size)
    with torch.no_grad():
        adapted = model(ids)
        lora.merge(model)
        merged = model(ids)
    assert not lora.adapted_modules(model)
    assert all(type(m) is torch.nn.Linear for name, m in model.named_modules() if name.endswith("_proj"))
    assert set(model.state_dict()) == set(random_model(tiny_config()).state_dict())  # plain HF names again
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


def test_save_and_load_adapters_round_trip(tmp_path: Path) -> None:
    model = random_model(tiny_config())
    lora.apply(model, r=4, alpha=8, targets=("v_proj", "up_proj"), layers=[1])
    randomize_adapters_(model)
    lora.save(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["layers"] == [1]

    fresh = lora.load(random_model(tiny_config()), tmp_path / "adapter")
    assert list(lora.adapted_modules(fresh)) == ["model.layers.1.self_attn.v_proj", "model.layers.1.mlp.up_proj"]
    ids = sample_ids(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))


def test_layers_limit_where_adapters_go() -> None:
    model = random_model(tiny_config(num_hidden_layers=3))
    names = lora.apply(model, targets="q_proj", layers=[2])
    assert names == ["model.layers.2.self_attn.q_proj"]


def test_bad_targets_and_files_are_clear_errors(tmp_path: Path) -> None:
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match=r"LoRA targets \['qkv'\] match no Linear layer of the model; it has: down_proj, gate_proj, k_proj, lm_head"):
        lora.apply(model, targets=("q_proj", "qkv"))
    with pytest.raises(ValueError, match=r"LoRA layers \[5\] do not exist: the model has layers 0 to 1"):
        lora.apply(model, layers=[1, 5])
    with pytest.raises(ValueError, match="targets must be a non-empty sequence"):
        lora.apply(model, targets=())
    with pytest.raises(ValueError, match="rank r must be an integer >= 1"):
        lora.apply(model, r=0)
    assert not lora.adapted_modules(model) and all(p.requires_grad for p in model.parameters())

    lora.apply(model)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.apply(model)
    with pytest.raises(ValueError, match="no LoRA adapters to save"):
        lora.save(random_model(tiny_config()), tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="no adapter_config.json"):
        lora.load(random_model(tiny_config()), tmp_path)

    lora.save(model, tmp_path / "adapter")
    bigger = random_model(tiny_config(heads=8))
    with pytest.raises(ValueError, match=r"adapter_model.safetensors does not fit this model: wrong shape: model.layers.0.self_attn.q_proj.lora_A"):
        lora.load(bigger, tmp_path / "adapter")


def test_exercise_lora_merge(capsys) -> None:
    def answer(weight, lora_A, lora_B, alpha, r):  # the notebook's solution, written independently
        return weight + (alpha / r) * lora_B @ lora_A

    def wrong(weight, lora_A, lora_B, alpha, r):  # forgets the alpha / r scale
        return weight + lora_B @ lora_A

    assert_exercise_check(check_exercise_lora_merge, answer, wrong, capsys, match="LoRA merge")


def test_saved_adapter_is_readable_by_others(tmp_path: Path) -> None:
    model = random_model(tiny_config())
    lora.apply(model)
    lora.save(model, tmp_path / "adapter")
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in (tmp_path / "adapter").iterdir()} == {0o644}
