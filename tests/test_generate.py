"""Generation on tiny random models: KV cache vs recomputation, HF parity, batches, sampling,
GenerationConfig and its keyword shorthand, errors."""

import copy

import pytest
import torch
from helpers import assert_close, hf_twin, random_model, tiny_config
from transformers.generation import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from minqwen import GenerationConfig
from minqwen.generate import DEFAULT_MAX_NEW_TOKENS, as_prompts, default_stop_ids, generate, generate_steps, padded_batch
from minqwen.sampling import Sampler, apply_repetition_penalty, top_k_filter, top_p_filter

VOCAB = 257


def random_prompts(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model():
    return random_model(tiny_config(heads=4, kv_heads=2))


# --------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1), (6, 2)])
def test_cached_decoding_equals_recomputation(implementation, heads, kv_heads):
    model = random_model(tiny_config(heads, kv_heads), seed=1, attn_implementation=implementation)
    prompt = random_prompts([9])
    cached = list(generate_steps(model, prompt, 24, stop_token_ids=[]))
    recomputed = list(generate_steps(model, prompt, 24, stop_token_ids=[], use_cache=False))
    assert [s.token_ids for s in cached] == [s.token_ids for s in recomputed]
    assert_close(torch.stack([s.logits for s in cached]), torch.stack([s.logits for s in recomputed]))


def test_continuing_from_a_cache_equals_a_fresh_run(model):
    prompt = random_prompts([12], seed=9)[0]
    cache = model.make_cache(batch_size=1, max_seq_len=30)
    list(generate_steps(model, [prompt[:7]], 3, stop_token_ids=[], cache=cache))  # holds prompt[:7] + 2 new
    cache.length = 7  # keep the shared prefix only
    continued = [s.token_ids[0] for s in generate_steps(model, [prompt], 5, stop_token_ids=[], cache=cache)]
    assert continued == generate(model, prompt, 5, stop_token_ids=[])
    cache.length = 12
    with pytest.raises(ValueError, match="fewer than the prompt's 12"):
        generate_steps(model, [prompt], 5, cache=cache)
    cache.length = 0
    with pytest.raises(ValueError, match="room for 30 tokens"):
        generate_steps(model, [prompt], 40, cache=cache)
    with pytest.raises(ValueError, match="single prompt"):
        generate_steps(model, [prompt, prompt], 5, cache=cache)


def test_greedy_equals_transformers_generate(model):
    hf = hf_twin(model)
    for prompt in random_prompts([1, 6, 13], seed=2):
        theirs = hf.generate(torch.tensor([prompt]), max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert generate(model, prompt, 20, stop_token_ids=[]) == theirs[0, len(prompt) :].tolist()


def test_generate_returns_new_ids_only_and_respects_max_new_tokens(model):
    prompt = random_prompts([5])[0]
    out = generate(model, prompt, 7, stop_token_ids=[])
    assert len(out) == 7 and all(isinstance(t, int) for t in out)
    assert generate(model, prompt, 0) == []


def test_input_forms_agree(model):
    prompt = random_prompts([6])[0]
    expected = generate(model, prompt, 5, stop_token_ids=[])
    assert generate(model, torch.tensor(prompt), 5, stop_token_ids=[]) == expected
    assert generate(model, torch.tensor([prompt, prompt]), 5, stop_token_ids=[]) == [expected, expected]
    assert generate(model, [prompt], 5, stop_token_ids=[]) == [expected]


# --------------------------------------------------------------------------- stopping
def test_stops_at_a_stop_id_which_is_left_out(model):
    prompt = random_prompts([4])[0]
    free = generate(model, prompt, 12, stop_token_ids=[])
    stop = free[5]
    first = free.index(stop)
    assert generate(model, prompt, 12, stop_token_ids=[stop]) == free[:first]


def test_default_stop_ids_come_from_the_config():
    single = random_model(tiny_config(eos_token_id=3))
    several = random_model(tiny_config(eos_token_id=[3, 7]))
    none = random_model(tiny_config())
    assert (default_stop_ids(single), default_stop_ids(several), default_stop_ids(none)) == ({3}, {3, 7}, set())
    prompt = random_prompts([4])[0]
    free = generate(none, prompt, 12)
    several.load_state_dict(none.state_dict())
    several.config.eos_token_id = [free[4], free[8]]
    assert generate(several, prompt, 12) == free[: min(free.index(free[4]), free.index(free[8]))]


def test_generation_stops_when_the_context_is_full():
    model = random_model(tiny_config(max_position_embeddings=16))
    assert len(generate(model, random_prompts([10])[0], 100, stop_token_ids=[])) == 6


# --------------------------------------------------------------------------- batches
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_batched_greedy_equals_each_prompt_alone(implementation):
    model = random_model(tiny_config(6, 2), seed=3, attn_implementation=implementation)
    prompts = random_prompts([3, 11, 1, 7], seed=4)
    batched = generate(model, prompts, 15, stop_token_ids=[])
    assert batched == [generate(model, p, 15, stop_token_ids=[]) for p in prompts]


def test_batched_logits_equal_each_prompt_alone(model):
    prompts = random_prompts([2, 8], seed=5)
    batched = list(generate_steps(model, prompts, 6, stop_token_ids=[]))
    for row, prompt in enumerate(prompts):
        alone = list(generate_steps(model, [prompt], 6, stop_token_ids=[]))
        assert_close(torch.stack([s.logits[row] for s in batched]), torch.stack([s.logits[0] for s in alone]))


def test_batch_rows_stop_independently(model):
    prompts = random_prompts([3, 9], seed=6)
    free = generate(model, prompts, 10, stop_token_ids=[])
    stop = free[0][2]
    expected = [row[: row.index(stop)] if stop in row else row for row in free]
    assert generate(model, prompts, 10, stop_token_ids=[stop]) == expected


def test_padded_batch_layout():
    ids, mask, positions = padded_batch([[5, 6, 7], [8]], new_tokens=2)
    assert ids.tolist() == [[5, 6, 7, 0, 0], [0, 0, 8, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]]
    assert positions.tolist() == [[0, 1, 2, 3, 4], [0, 0, 0, 1, 2]]


# --------------------------------------------------------------------------- sampling
def test_top_k_filter_on_hand_made_logits():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [0.5, 0.25, 0.375, 0.75]])
    inf = float("-inf")
    assert top_k_filter(logits, 2).tolist() == [[inf, 4.0, 3.0, inf], [0.5, inf, inf, 0.75]]
    assert torch.equal(top_k_filter(logits, 10), logits)


def test_top_p_filter_on_hand_made_distribution():
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[None]
    kept = lambda p: torch.isfinite(top_p_filter(logits, p))[0].tolist()  # noqa: E731
    assert kept(0.4) == [True, False, False, False]  # the top token alone holds 0.5 >= 0.4
    assert kept(0.75) == [True, True, False, False]
    assert kept(0.85) == [True, True, True, False]
    assert kept(0.01) == [True, False, False, False]  # the top token always survives
    assert kept(1.0) == [True, True, True, True]


def test_filters_match_transformers_warpers():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    for k in (1, 5, 49):
        assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(None, logits.clone()))
    for p in (0.1, 0.5, 0.9, 0.99):
        assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits.clone()))


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(2, 20, generator=torch.Generator().manual_seed(1))
    previous = torch.tensor([[1, 5, 5, 7], [0, 19, 3, 2]])
    seen = torch.zeros(2, 20, dtype=torch.bool).scatter_(1, previous, True)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(previous, logits.clone())
    assert_close(apply_repetition_penalty(logits, seen, 1.3), expected)


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(model):
    prompt = random_prompts([5])[0]
    settings = dict(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.2, stop_token_ids=[])
    torch.manual_seed(123)
    first = generate(model, prompt, 20, seed=7, **settings)
    draw_after_generating = torch.rand(1)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(1), draw_after_generating)  # the seeded run used its own generator
    assert generate(model, prompt, 20, seed=7, **settings) == first
    assert generate(model, prompt, 20, seed=8, **settings) != first


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU here")),
        pytest.param("mps", marks=pytest.mark.skipif(not torch.backends.mps.is_available(), reason="no Apple MPS here")),
    ],
)
def test_generation_runs_on_the_models_device_and_seeds_reproduce_there(model, device):
    on_device = copy.deepcopy(model).to(device)
    prompts = random_prompts([5, 2], seed=12)
    sampled = GenerationConfig(max_new_tokens=10, temperature=1.0, top_p=0.95, repetition_penalty=1.1, seed=3, stop_token_ids=[])
    first = generate(on_device, prompts, generation_config=sampled)
    assert generate(on_device, prompts, generation_config=sampled) == first
    assert all(len(row) == 10 for row in first)
    steps = list(generate_steps(on_device, prompts[:1], 6, stop_token_ids=[]))
    reference = list(generate_steps(model, prompts[:1], 6, stop_token_ids=[]))
    assert steps[0].logits.device.type == device
    logits = torch.stack([s.logits for s in steps]).cpu()
    torch.testing.assert_close(logits, torch.stack([s.logits for s in reference]), atol=1e-4, rtol=1e-4)


def test_unseeded_sampling_follows_torch_manual_seed(model):
    prompt = random_prompts([5])[0]
    torch.manual_seed(5)
    first = generate(model, prompt, 10, temperature=1.0, stop_token_ids=[])
    torch.manual_seed(5)
    assert generate(model, prompt, 10, temperature=1.0, stop_token_ids=[]) == first


def test_sampling_differs_from_greedy_and_cold_temperature_converges_to_greedy(model):
    prompt = random_prompts([5])[0]
    greedy = generate(model, prompt, 20, stop_token_ids=[])
    assert generate(model, prompt, 20, temperature=1.5, seed=0, stop_token_ids=[]) != greedy
    assert generate(model, prompt, 20, temperature=1e-4, seed=0, stop_token_ids=[]) == greedy


def test_sampled_frequencies_follow_the_filtered_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0]]).repeat(4000, 1)
    sampler = Sampler(temperature=0.7, top_k=4, top_p=0.9, seed=0)
    expected = sampler.filtered_logits(logits[:1]).softmax(-1)[0]
    counts = torch.bincount(sampler(logits), minlength=5).float() / len(logits)
    assert counts[4] == 0 and expected[4] == 0
    assert (counts - expected).abs().max() < 0.03


def test_batched_sampling_rows_are_independent_draws(model):
    prompt = random_prompts([5])[0]
    rows = generate(model, [prompt] * 3, 15, temperature=1.0, seed=1, stop_token_ids=[])
    assert len({tuple(r) for r in rows}) > 1


# --------------------------------------------------------------------------- GenerationConfig
def test_generation_config_equals_its_keyword_shorthand_and_keywords_win(model):
    prompt = random_prompts([5], seed=11)[0]
    settings = dict(temperature=0.9, top_k=30, top_p=0.9, repetition_penalty=1.2, seed=4, stop_token_ids=[])
    config = GenerationConfig(max_new_tokens=12, **settings)
    by_config = generate(model, prompt, generation_config=config)
    assert len(by_config) == 12
    assert by_config == generate(model, prompt, 12, **settings)
    assert generate(model, prompt, 5, generation_config=config) == by_config[:5]  # max_new_tokens wins
    greedy = generate(model, prompt, 12, stop_token_ids=[])
    assert generate(model, prompt, generation_config=config, temperature=0, repetition_penalty=None) == greedy
    assert len(generate(model, prompt, stop_token_ids=[])) == DEFAULT_MAX_NEW_TOKENS
    with pytest.raises(TypeError, match="unknown generation setting 'temprature'"):
        generate(model, prompt, temprature=0.5)
    with pytest.raises(TypeError, match="must be a minqwen.GenerationConfig"):
        generate(model, prompt, generation_config={"temperature": 0.5})


def test_generation_config_stores_stop_ids_immutably():
    config = GenerationConfig(stop_token_ids=[3, 7])
    assert config.stop_token_ids == (3, 7) and hash(config) == hash(GenerationConfig(stop_token_ids=(3, 7)))
    assert config.updated(temperature=0.5) == GenerationConfig(temperature=0.5, stop_token_ids=(3, 7))
    assert config.updated(max_new_tokens=None) is config  # None means "not given"


# --------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(temperature=-0.5), "temperature must be"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(top_k=0), "top_k must be an integer >= 1"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be"),
        (dict(max_new_tokens=-1), "max_new_tokens must be an integer >= 0"),
        (dict(stop_token_ids=["<|im_end|>"]), "stop_token_ids must be token ids"),
        (dict(seed=1.5), "seed must be an integer"),
    ],
)
def test_bad_settings_raise_value_error(model, settings, message):
    with pytest.raises(ValueError, match=message):
        generate(model, [1, 2, 3], **settings)


def test_bad_prompts_raise_value_error(model):
    with pytest.raises(ValueError, match="the prompt is empty"):
        generate(model, [])
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1, 2], []])
    with pytest.raises(ValueError, match=r"token id 300, outside the vocabulary \[0, 257\)"):
        generate(model, [1, 300])
    with pytest.raises(TypeError, match="encode the text"):
        generate(model, "hello")
    short = random_model(tiny_config(max_position_embeddings=8))
    with pytest.raises(ValueError, match="the prompt has 8 tokens but the model's context holds 8"):
        generate(short, list(range(8)))


def test_bad_settings_fail_before_any_compute(model):
    calls = []
    handle = model.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(ValueError):
            generate_steps(model, [[1, 2]], 5, top_k=-1)
        with pytest.raises(ValueError):
            generate_steps(model, [[]], 5)
    finally:
        handle.remove()
    assert calls == []


def test_as_prompts_forms():
    assert as_prompts([1, 2]) == ([[1, 2]], False)
    assert as_prompts([[1], [2, 3]]) == ([[1], [2, 3]], True)
    assert as_prompts(torch.tensor([[1, 2]])) == ([[1, 2]], True)
    with pytest.raises(ValueError, match="integer ids"):
        as_prompts(torch.zeros(2, 2))

