"""Long context on tiny random models: YaRN / linear / dynamic-NTK RoPE and sliding-window layers
equal HF transformers 5.23 (fp32 <= 1e-5); Dual Chunk Attention's two implementations equal each
other, the written-out definition, and plain attention inside one chunk; configs of real
Qwen2.5 long-context checkpoints load as they are."""

import copy
import inspect
import math

import pytest
import torch
import transformers
from helpers import assert_close, assert_exercise_check, hf_twin, random_model, tiny_config

import minqwen.model
from minqwen import Qwen2Config
from minqwen.attention import Qwen2Attention
from minqwen.dca import (
    INTER,
    INTRA,
    SUCCESSIVE,
    DualChunkAttention,
    DualChunkSettings,
    chunked_dca_attention,
    dca_position_matrices,
    reference_dca_attention,
)
from minqwen.rope import RotaryEmbedding, apply_rotary, linear_ramp, rope_inv_freq, yarn_correction_range

# Parity tests are pinned to the transformers whose RoPE code they were written against
# (older releases computed YaRN's factor differently).
assert transformers.__version__ == "5.23.0", f"parity tests pin transformers 5.23.0, found {transformers.__version__}"

ORIGINAL = 64  # "trained" length of the tiny models; sequences go well past it


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs)


def hf_logits(model, ids):
    hf = hf_twin(model)
    with torch.no_grad():
        return hf(ids).logits, hf


def ids_of(length, batch=2, seed=0):
    return torch.randint(0, 257, (batch, length), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- RoPE scalings vs HF
SCALINGS = {
    "yarn (type)": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
    "yarn (rope_type), betas, no truncate": {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": ORIGINAL,
        "beta_fast": 16,
        "beta_slow": 2,
        "truncate": False,
    },
    "yarn mscale/mscale_all_dim": {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
        "mscale": 0.707,
        "mscale_all_dim": 1.0,
    },
    "yarn explicit attention_factor": {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": ORIGINAL,
        "attention_factor": 1.3,
    },
    "yarn factor from lengths": {"type": "yarn", "factor": None, "original_max_position_embeddings": ORIGINAL},
    "linear": {"type": "linear", "factor": 3.0},
}


@pytest.mark.parametrize("name", list(SCALINGS))
def test_rope_scaling_logits_match_hf_past_the_trained_length(name):
    config = tiny_config(rope_scaling=copy.deepcopy(SCALINGS[name]), max_position_embeddings=4 * ORIGINAL, rope_theta=1000.0)
    model = random_model(config)
    ids = ids_of(300)
    ours = logits(model, ids)
    theirs, hf = hf_logits(model, ids)
    assert_close(ours, theirs)
    assert model.model.rotary_emb.attention_factor == pytest.approx(hf.model.rotary_emb.attention_scaling)
    plain = random_model(tiny_config(max_position_embeddings=4 * ORIGINAL, rope_theta=1000.0))
    assert (logits(plain, ids) - ours).abs().max() > 1e-2, "the scaling must change the logits"


def test_yarn_factor_semantics():
    """The explicit factor wins; the attention factor is 0.1 ln(factor) + 1 and multiplies cos/sin."""
    config = tiny_config(
        max_position_embeddings=1000,  # implies factor 1000 / 64, ignored: the explicit 4 wins
        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL},
        rope_theta=1000.0,
    )
    inv_freq, attention_factor = rope_inv_freq(config)
    plain, _ = rope_inv_freq(tiny_config(rope_theta=1000.0))
    assert attention_factor == pytest.approx(0.1 * torch.log(torch.tensor(4.0)).item() + 1)
    assert inv_freq[0] == pytest.approx(plain[0])  # fastest pair: untouched
    assert inv_freq[-1] == pytest.approx(plain[-1] / 4)  # slowest pair: fully interpolated
    cos, _ = RotaryEmbedding(config)(torch.zeros(1, 1, dtype=torch.long), torch.float32)
    assert torch.allclose(cos, torch.full_like(cos, attention_factor))


def test_yarn_ramp_pieces():
    """Pairs turning > beta_fast times over the trained length keep their frequency, < beta_slow get it / factor."""
    dim, base, length = 64, 10000.0, 2048
    turns = lambda i: length / (2 * math.pi * base ** (2 * i / dim))  # noqa: E731  rotations of pair i
    low, high = yarn_correction_range(dim, base, length, beta_fast=32, beta_slow=1)
    assert turns(low) >= 32 > turns(low + 1) and turns(high - 1) > 1 >= turns(high)
    ramp = linear_ramp(low, high, dim // 2)
    assert ramp[: low + 1].eq(0).all() and ramp[high:].eq(1).all() and (ramp.diff() >= 0).all()


def test_rope_parameters_form_matches_hf():
    """HF's newer ``rope_parameters`` (rope_theta inside) loads like ``rope_scaling``."""
    d = tiny_config().to_dict()
    del d["rope_theta"], d["rope_scaling"]
    d["max_position_embeddings"] = 4 * ORIGINAL
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 500.0, "factor": 4.0, "original_max_position_embeddings": ORIGINAL}
    config = Qwen2Config.from_dict(copy.deepcopy(d))
    assert config.rope_theta == 500.0 and config.rope_scaling["rope_type"] == "yarn"
    model = random_model(config)
    ids = ids_of(200)
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**d)).eval()
    hf.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert_close(logits(model, ids), hf(ids).logits)


def test_dynamic_ntk_matches_hf_in_prefill_and_decode():
    """Dynamic NTK recomputes frequencies from the longest position, in one forward and step by step."""
    config = tiny_config(rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=ORIGINAL)
    model = random_model(config)
    ids = ids_of(150, batch=1)
    assert_close(logits(model, ids), hf_logits(model, ids)[0])

    hf = hf_twin(model)  # a fresh one: HF's rotary keeps the longest length it has seen
    cache = model.make_cache(1, 150)
    steps = [logits(model, ids[:, :100], cache=cache)]
    with torch.no_grad():
        hf_out = hf(ids[:, :100], use_cache=True)
        hf_steps, past = [hf_out.logits], hf_out.past_key_values
        for t in range(100, 150):
            steps.append(logits(model, ids[:, t : t + 1], cache=cache))
            hf_out = hf(ids[:, t : t + 1], past_key_values=past, use_cache=True)
            hf_steps.append(hf_out.logits)
            past = hf_out.past_key_values
    assert_close(torch.cat(steps, 1), torch.cat(hf_steps, 1))


def test_unknown_or_incomplete_rope_scaling_is_a_clear_error():
    with pytest.raises(ValueError, match="'longrope' is not supported"):
        random_model(tiny_config(rope_scaling={"type": "longrope", "factor": 2.0}))
    with pytest.raises(ValueError, match="needs factor"):
        random_model(tiny_config(rope_scaling={"type": "linear"}))


# --------------------------------------------------------------------------- sliding-window layers
WINDOWED = dict(num_hidden_layers=3, use_sliding_window=True, max_window_layers=1)


@pytest.mark.parametrize("window", [8, 16])
def test_sliding_window_prefill_matches_hf_and_hf_really_windows(window):
    config = tiny_config(sliding_window=window, **WINDOWED)
    assert [config.layer_uses_sliding_window(i) for i in range(3)] == [False, True, True]
    model = random_model(config)
    ids = ids_of(64)
    theirs, hf = hf_logits(model, ids)
    assert hf.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert_close(logits(model, ids), theirs)
    unwindowed = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**config.to_dict(), "use_sliding_window": False}))
    unwindowed.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (unwindowed.eval()(ids).logits - theirs).abs().max() > 1e-2, "HF must window these layers"
    assert_close(logits(model, ids[:, :window]), logits(random_model(tiny_config(num_hidden_layers=3)), ids[:, :window]))


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_sliding_window_cached_decode_matches_hf(implementation):
    config = tiny_config(sliding_window=8, **WINDOWED)
    model = random_model(config, attn_implementation=implementation)
    ids = ids_of(64, batch=1)
    cache = model.make_cache(1, 64)
    ours = [logits(model, ids[:, :20], cache=cache)] + [logits(model, ids[:, t : t + 1], cache=cache) for t in range(20, 64)]
    hf = hf_twin(model)
    with torch.no_grad():
        out = hf(ids[:, :20], use_cache=True)
        theirs, past = [out.logits], out.past_key_values
        for t in range(20, 64):
            out = hf(ids[:, t : t + 1], past_key_values=past, use_cache=True)
            theirs.append(out.logits)
            past = out.past_key_values
    assert_close(torch.cat(ours, 1), torch.cat(theirs, 1))
    assert_close(torch.cat(ours, 1), logits(model, ids))


def test_layer_types_in_config_json_win_like_in_hf():
    """A config saved by transformers 5 lists ``layer_types``; windows follow it, as in HF."""
    d = tiny_config(sliding_window=8, **WINDOWED).to_dict()
    d["layer_types"] = ["sliding_attention", "full_attention", "sliding_attention"]
    config = Qwen2Config.from_dict(d)
    assert [config.layer_uses_sliding_window(i) for i in range(3)] == [True, False, True]
    model = random_model(config)
    ids = ids_of(40)
    theirs, _ = hf_logits(model, ids)
    assert_close(logits(model, ids), theirs)


# --------------------------------------------------------------------------- Dual Chunk Attention
DCA = {"chunk_size": 12, "local_size": 4, "original_max_position_embeddings": 16}  # chunks of 8 tokens


def dca_model(implementation="sdpa", dca=None, seed=0):
    return random_model(tiny_config(dual_chunk_attention_config=dict(dca or DCA)), seed, implementation)


def test_position_matrices_follow_the_definition():
    """Chunks of 4 (C = 6, W = 2): keys at p mod 4; queries at r, min(r + 4, 6), min(7, 6) = 6."""
    settings = DualChunkSettings(chunk_size=6, local_size=2)
    positions = torch.arange(10)
    query_pos, key_pos, part, visible = dca_position_matrices(positions, positions, settings)
    assert key_pos[0].tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert part[9].tolist() == [INTER] * 4 + [SUCCESSIVE] * 4 + [INTRA] * 2
    assert query_pos[9].tolist() == [6] * 4 + [5] * 4 + [1] * 2  # r = 1: inter 6, successive 1 + 4, intra 1
    assert query_pos[7, 0] == 6 and query_pos[7, 3] == 6  # r = 3: successive min(3 + 4, 6) = 6
    assert visible.equal(torch.ones(10, 10, dtype=torch.bool).tril())
    distance = (query_pos - key_pos)[visible]
    assert distance.min() >= 0 and distance.max() <= settings.chunk_size


def test_reference_equals_the_pairwise_definition():
    """Every score is q rotated at query_pos[i, j] dotted with k rotated at key_pos[i, j]."""
    settings = DualChunkSettings(chunk_size=6, local_size=2, original_max_position_embeddings=5)
    config = tiny_config(heads=2, kv_heads=1)
    rotary = RotaryEmbedding(config)
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 11, 8), torch.randn(1, 1, 11, 8), torch.randn(1, 1, 11, 8)
    positions = torch.arange(11)
    query_pos, key_pos, _, visible = dca_position_matrices(positions, positions, settings)

    def rotated(x, pos):  # x (..., D) at one position
        cos, sin = rotary(torch.tensor([[pos]]), torch.float32)
        return apply_rotary(x[None, None, None], cos, sin)[0, 0, 0]

    expected = torch.zeros(1, 2, 11, 8)
    for h in range(2):
        for i in range(11):
            scores = torch.full((11,), float("-inf"))
            for j in range(i + 1):
                scores[j] = rotated(q[0, h, i], int(query_pos[i, j])) @ rotated(k[0, 0, j], int(key_pos[i, j]))
            scale = max(1.0, 0.1 * torch.log(torch.tensor((i + 1) / 5)).item() + 1) / 8**0.5
            expected[0, h, i] = (scores * scale).softmax(-1) @ v[0, 0]

    def table(pos):
        return rotary(pos[None], torch.float32)

    queries = {part: apply_rotary(q, *table(p)) for part, p in settings.query_positions(positions).items()}
    keys = apply_rotary(k, *table(settings.key_positions(positions)))
    assert_close(reference_dca_attention(queries, keys, v, positions, settings, 8**-0.5), expected)
    assert visible.sum() == 66


@pytest.mark.parametrize("length", [5, 8, 13, 19, 44])  # 1 chunk, exactly 1, 2, 3 and 6 chunks (ragged)
def test_chunked_dca_equals_reference(length):
    ids = ids_of(length)
    assert_close(logits(dca_model("sdpa"), ids), logits(dca_model("eager"), ids))


@pytest.mark.parametrize("block", [1, 3, 8, 100])
def test_chunked_dca_blocks_change_nothing(block):
    settings = DualChunkSettings.from_dict(DCA)
    torch.manual_seed(1)
    queries = {part: torch.randn(2, 4, 30, 8) for part in (INTRA, SUCCESSIVE, INTER)}
    k, v = torch.randn(2, 2, 37, 8), torch.randn(2, 2, 37, 8)
    expected = reference_dca_attention(queries, k, v, torch.arange(7, 37), settings, 0.35)
    assert_close(chunked_dca_attention(queries, k, v, 7, settings, 0.35, block=block), expected)


def test_dca_equals_ordinary_attention_within_one_chunk():
    ids = ids_of(8)  # chunk_len = 8; positions < 16, so no length scaling either
    plain = random_model(tiny_config())
    for implementation in ("sdpa", "eager"):
        assert_close(logits(dca_model(implementation), ids), logits(plain, ids))
    assert (logits(dca_model(), ids_of(30)) - logits(plain, ids_of(30))).abs().max() > 1e-2


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_dca_prefill_then_cached_decode_equals_full_forward(implementation):
    model = dca_model(implementation)
    ids = ids_of(45)
    full = logits(model, ids)
    cache = model.make_cache(2, 45)
    pieces = [logits(model, ids[:, :11], cache=cache), logits(model, ids[:, 11:27], cache=cache)]
    pieces += [logits(model, ids[:, t : t + 1], cache=cache) for t in range(27, 45)]
    assert_close(torch.cat(pieces, 1), full)


def test_dca_length_scaling_is_applied_once():
    settings = DualChunkSettings(12, 4, original_max_position_embeddings=16)
    scale = settings.length_scale(torch.tensor([0, 15, 16, 159]))
    assert scale.tolist() == pytest.approx([1.0, 1.0, 1.0 + 0.1 * math.log(17 / 16), 1.0 + 0.1 * math.log(10)])
    ids = ids_of(40)
    unscaled = logits(dca_model(dca={**DCA, "original_max_position_embeddings": 0}), ids)
    scaled = logits(dca_model(), ids)
    assert_close(scaled[:, :16], unscaled[:, :16])
    assert (scaled[:, 16:] - unscaled[:, 16:]).abs().max() > 1e-3


def test_dca_input_errors():
    model = dca_model()
    with pytest.raises(ValueError, match="unpadded"):
        model(ids_of(10), attention_mask=torch.tensor([[0] + [1] * 9] * 2))
    with pytest.raises(ValueError, match="position_ids 0..9"):
        model(ids_of(10), position_ids=torch.arange(1, 11).expand(2, 10))
    with pytest.raises(ValueError, match="local_size .* must be smaller than chunk_size"):
        dca_model(dca={"chunk_size": 8, "local_size": 8})
    with pytest.raises(ValueError, match="missing chunk_size"):
        dca_model(dca={"local_size": 8})
    with pytest.raises(ValueError, match="use_sliding_window"):
        random_model(tiny_config(dual_chunk_attention_config=dict(DCA), use_sliding_window=True, sliding_window=8))


def test_dca_is_a_swapped_in_module_with_the_same_parameters_and_names():
    model = random_model(tiny_config())
    parameters, keys = dict(model.named_parameters()), list(model.state_dict())
    model.extend_context(128, dual_chunk_attention_config=dict(DCA))
    assert all(type(layer.self_attn) is DualChunkAttention for layer in model.model.layers)
    assert list(model.state_dict()) == keys, "state-dict keys stay HF's"
    assert all(p is parameters[name] for name, p in model.named_parameters())
    model.extend_context(512)
    assert all(type(layer.self_attn) is Qwen2Attention for layer in model.model.layers)
    assert all(p is parameters[name] for name, p in model.named_parameters())
    padded = torch.tensor([[0] + [1] * 9] * 2)
    assert torch.isfinite(logits(model, ids_of(10), attention_mask=padded)).all(), "plain attention takes padding again"
    assert "dca" not in inspect.signature(Qwen2Attention.forward).parameters


def test_dca_layers_build_no_dense_mask(monkeypatch):
    """DCA masks by chunk itself: the model must not build a (seq, seq) causal mask for it."""
    model = dca_model()
    expected = logits(model, ids_of(30))

    def refuse(*args, **kwargs):
        raise AssertionError("a causal mask was built for DCA layers")

    monkeypatch.setattr(minqwen.model, "causal_mask", refuse)
    assert_close(logits(model, ids_of(30)), expected)


# --------------------------------------------------------------------------- configs of real checkpoints
QWEN25_7B_INSTRUCT = {  # config.json of Qwen/Qwen2.5-7B-Instruct with the README's YaRN lines added
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "max_position_embeddings": 32768,
    "max_window_layers": 28,
    "model_type": "qwen2",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 152064,
    "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32768, "type": "yarn"},
}
QWEN25_7B_INSTRUCT_1M = {  # config.json of Qwen/Qwen2.5-7B-Instruct-1M (the fields that matter here)
    **{k: v for k, v in QWEN25_7B_INSTRUCT.items() if k != "rope_scaling"},
    "max_position_embeddings": 1010000,
    "rope_theta": 10000000.0,
    "sliding_window": 32768,
    "dual_chunk_attention_config": {"chunk_size": 262144, "local_size": 8192, "original_max_position_embeddings": 262144},
}
TINY = dict(hidden_size=32, intermediate_size=56, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=257)


@pytest.mark.parametrize("published", [QWEN25_7B_INSTRUCT, QWEN25_7B_INSTRUCT_1M], ids=["yarn", "dca"])
def test_real_long_context_configs_load_without_edits(published):
    config = Qwen2Config.from_dict(copy.deepcopy(published))
    assert config.to_dict()["rope_scaling"] == published.get("rope_scaling")
    assert config.to_dict().get("dual_chunk_attention_config") == published.get("dual_chunk_attention_config")
    with torch.device("meta"):  # the full-size model builds (shapes only)
        from minqwen import Qwen2ForCausalLM

        Qwen2ForCausalLM(config)
    tiny = random_model(Qwen2Config.from_dict({**copy.deepcopy(published), **TINY}))
    out = logits(tiny, ids_of(20))
    assert out.shape == (2, 20, 257) and torch.isfinite(out).all()


def test_real_yarn_config_equals_hf_on_tiny_shapes():
    config = Qwen2Config.from_dict({**copy.deepcopy(QWEN25_7B_INSTRUCT), **TINY, "rope_scaling": {"factor": 4.0, "original_max_position_embeddings": 32, "type": "yarn"}})
    model = random_model(config)
    ids = ids_of(100)
    assert_close(logits(model, ids), hf_logits(model, ids)[0])


# --------------------------------------------------------------------------- switching a loaded model
def test_extend_context_equals_building_with_the_config():
    base = random_model(tiny_config())
    ids = ids_of(40)
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    base.extend_context(128, rope_scaling=yarn)
    assert_close(logits(base, ids), logits(random_model(tiny_config(max_position_embeddings=128, rope_scaling=dict(yarn))), ids))
    base.extend_context(128, dual_chunk_attention_config=dict(DCA))
    assert_close(logits(base, ids), logits(random_model(tiny_config(max_position_embeddings=128, dual_chunk_attention_config=dict(DCA))), ids))
    base.extend_context(512)
    assert_close(logits(base, ids), logits(random_model(tiny_config()), ids))
    with pytest.raises(ValueError, match="local_size"):
        base.extend_context(128, dual_chunk_attention_config={"chunk_size": 4, "local_size": 4})
    assert base.config.dual_chunk_attention_config is None  # a failed switch changes nothing


# --------------------------------------------------------------------------- notebook exercises
def right_sliding_window_mask(q_len, kv_len, window):
    q_pos, k_pos = torch.arange(kv_len - q_len, kv_len)[:, None], torch.arange(kv_len)[None, :]
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


def right_dca_distances(seq, chunk_size, local_size):
    chunk_len, p = chunk_size - local_size, torch.arange(seq)
    q_chunk, k_chunk, r = (p // chunk_len)[:, None], (p // chunk_len)[None, :], (p % chunk_len)[:, None]
    query = torch.where(k_chunk == q_chunk, r, torch.where(k_chunk == q_chunk - 1, (r + chunk_len).clamp(max=chunk_size), min(2 * chunk_len - 1, chunk_size)))
    return torch.where(p[None, :] <= p[:, None], query - (p % chunk_len)[None, :], -1)


def right_merge(out_a, lse_a, out_b, lse_b):
    lse = torch.logaddexp(lse_a, lse_b)[:, None]
    return out_a * (lse_a[:, None] - lse).exp() + out_b * (lse_b[:, None] - lse).exp()


EXERCISES = [
    ("check_exercise_sliding_window_mask", right_sliding_window_mask, lambda q, s, w: right_sliding_window_mask(q, s, w + 1)),
    ("check_exercise_dca_distances", right_dca_distances, lambda s, c, w: right_dca_distances(s, c, 0)),
    ("check_exercise_merge_softmax", right_merge, lambda oa, la, ob, lb: (oa + ob) / 2),
]


@pytest.mark.parametrize("check,right,wrong", EXERCISES, ids=[e[0] for e in EXERCISES])
def test_exercise_checks(check, right, wrong, capsys):
    from minqwen import exercises

    assert_exercise_check(getattr(exercises, check), right, wrong, capsys)


def test_generate_with_dca_uses_the_cache_correctly():
    """minqwen.generate passes explicit positions; with DCA cached decoding equals recomputation."""
    import minqwen

    model = dca_model()
    prompts = ids_of(14).tolist()  # two prompts of equal length: no padding
    cached = minqwen.generate(model, prompts, max_new_tokens=20, stop_token_ids=[])
    recomputed = minqwen.generate(model, prompts, max_new_tokens=20, stop_token_ids=[], use_cache=False)
    assert cached == recomputed and len(cached[0]) == 20
    with pytest.raises(ValueError, match="unpadded"):
        minqwen.generate(model, [prompts[0], prompts[1][:5]], max_new_tokens=2)
