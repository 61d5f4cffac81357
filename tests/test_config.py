"""Qwen2Config: HF field names, round trips, presets and clear errors."""

import json

import pytest
import torch
from helpers import tiny_config

from minqwen import Qwen2Config, Qwen2ForCausalLM

transformers = pytest.importorskip("transformers", reason="transformers is in requirements-dev.txt")


def test_hf_config_json_loads_and_round_trips(tmp_path):
    hf = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    hf.save_pretrained(tmp_path)
    config = Qwen2Config.from_json(tmp_path / "config.json")
    assert (config.hidden_size, config.num_key_value_heads, config.tie_word_embeddings) == (64, 2, True)
    assert config.num_key_value_groups == 4 and config.head_dim == 8
    saved = json.loads((tmp_path / "config.json").read_text())
    again = config.to_dict()
    assert {k: again[k] for k in saved if k in again} == {k: saved[k] for k in saved if k in again}
    assert set(saved) <= set(again), "unknown keys must be kept aside and written back"
    back = transformers.Qwen2Config(**again)
    assert back.num_key_value_heads == 2 and back.hidden_size == 64


def test_unknown_keys_are_kept_not_fatal():
    config = tiny_config()
    d = {**config.to_dict(), "some_future_field": [1, 2]}
    loaded = Qwen2Config.from_dict(d)
    assert loaded.extra["some_future_field"] == [1, 2]
    assert loaded.to_dict()["some_future_field"] == [1, 2]


def test_missing_required_field_is_named():
    d = tiny_config().to_dict()
    del d["intermediate_size"]
    with pytest.raises(ValueError, match="intermediate_size"):
        Qwen2Config.from_dict(d)


@pytest.mark.parametrize(
    "overrides,culprit",
    [
        (dict(hidden_size=30, num_attention_heads=4), "num_attention_heads"),
        (dict(num_attention_heads=4, num_key_value_heads=3), "num_key_value_heads"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(hidden_act="gelu"), "hidden_act"),
    ],
)
def test_inconsistent_values_are_named(overrides, culprit):
    d = {**tiny_config().to_dict(), **overrides}
    with pytest.raises(ValueError, match=culprit):
        Qwen2Config.from_dict(d)


def test_bad_json_file_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        Qwen2Config.from_json(tmp_path / "config.json")


def test_rope_parameters_is_accepted():
    d = {**tiny_config().to_dict(), "rope_parameters": {"rope_type": "default", "rope_theta": 123.0}}
    d.pop("rope_theta")
    assert Qwen2Config.from_dict(d).rope_theta == 123.0


def test_qwen2_0_5b_parameter_count():
    with torch.device("meta"):
        model = Qwen2ForCausalLM(Qwen2Config.qwen2_0_5b())
    assert model.num_parameters() == 494_032_768
    assert model.num_parameters(exclude_embeddings=True) == 357_898_112


def test_a_meta_built_model_has_real_rope_tables_after_loading():
    """RoPE's inv_freq is computed from the config, for real even on meta: loading need not rebuild it."""
    config = tiny_config()
    weights = Qwen2ForCausalLM(config).state_dict()
    with torch.device("meta"):
        skeleton = Qwen2ForCausalLM(config)
    skeleton.load_state_dict(weights, assign=True)
    assert torch.equal(skeleton.model.rotary_emb.inv_freq, Qwen2ForCausalLM(config).model.rotary_emb.inv_freq)


def test_head_dim_is_hf_s_name_and_head_size_is_deprecated():
    config = tiny_config(heads=4, head_dim=8)
    assert config.head_dim == 8 and "head_dim" not in config.to_dict(), "the derived value is not written"
    wide = Qwen2Config.from_dict({**config.to_dict(), "head_dim": 16})
    assert wide.to_dict()["head_dim"] == 16 and Qwen2ForCausalLM(wide).model.layers[0].self_attn.q_proj.out_features == 64
    with pytest.warns(DeprecationWarning, match="head_dim"):
        assert config.head_size == 8
