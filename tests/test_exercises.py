"""The notebooks' exercise checks: a right answer passes, a wrong one raises, a stub says "not done yet".

The right answers here are the notebooks' solutions, written independently of minqwen's modules.
"""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_exercise_check

from minqwen import exercises


def stub(*args):
    raise NotImplementedError


# ------------------------------------------------------------------ right answers (the notebooks' solutions)
def next_token(model, input_ids):
    with torch.no_grad():
        return model(input_ids)[:, -1, :].argmax(dim=-1)


def rms_norm(x, weight, eps):
    x32 = x.float()
    normalized = x32 / torch.sqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return weight * normalized.to(x.dtype)


def rope_complex(x, positions, theta):
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half) * 2 / x.shape[-1])
    rotation = torch.polar(torch.ones(len(positions), half), positions[:, None].float() * inv_freq)
    z = torch.complex(x[..., :half], x[..., half:]) * rotation
    return torch.cat((z.real, z.imag), dim=-1)


def causal_mask(q_len, kv_len):
    return torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)


def swiglu(x, w_gate, w_up, w_down):
    return (F.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T


def count_parameters(config):
    hidden, kv_width = config.hidden_size, config.num_key_value_heads * config.head_dim
    q_width = config.num_attention_heads * config.head_dim
    attention = hidden * q_width + q_width + 2 * (hidden * kv_width + kv_width) + q_width * hidden
    mlp = 3 * hidden * config.intermediate_size
    layer = attention + mlp + 2 * hidden
    embedding = config.vocab_size * hidden
    head = 0 if config.tie_word_embeddings else embedding
    return embedding + config.num_hidden_layers * layer + hidden + head


# ------------------------------------------------------------------ wrong answers: each a classic mistake
def next_token_first_position(model, input_ids):
    return model(input_ids)[:, 0, :].argmax(dim=-1)


def layer_norm_instead(x, weight, eps):
    return weight * F.layer_norm(x, x.shape[-1:], eps=eps)


def rms_norm_weight_before_cast(x, weight, eps):
    x32 = x.float()
    return (weight.float() * x32 / torch.sqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)


def rope_interleaved_pairs(x, positions, theta):
    half = x.shape[-1] // 2
    inv_freq = theta ** (-torch.arange(half) * 2 / x.shape[-1])
    rotation = torch.polar(torch.ones(len(positions), half), positions[:, None].float() * inv_freq)
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], half, 2).contiguous()) * rotation
    return torch.view_as_real(z).flatten(-2)


def mask_without_cache_offset(q_len, kv_len):
    return torch.ones(q_len, kv_len, dtype=torch.bool).tril()


def swiglu_gate_on_up(x, w_gate, w_up, w_down):
    return ((x @ w_gate.T) * F.silu(x @ w_up.T)) @ w_down.T


def count_parameters_head_always_counted(config):
    return count_parameters(config) + (config.vocab_size * config.hidden_size if config.tie_word_embeddings else 0)


CASES = [
    (exercises.check_exercise_next_token, next_token, next_token_first_position),
    (exercises.check_exercise_rms_norm, rms_norm, layer_norm_instead),
    (exercises.check_exercise_rope_complex, rope_complex, rope_interleaved_pairs),
    (exercises.check_exercise_causal_mask, causal_mask, mask_without_cache_offset),
    (exercises.check_exercise_swiglu, swiglu, swiglu_gate_on_up),
    (exercises.check_exercise_parameter_count, count_parameters, count_parameters_head_always_counted),
]
IDS = [check.__name__ for check, _, _ in CASES]


@pytest.mark.parametrize("check,right,wrong", CASES, ids=IDS)
def test_right_answer_passes(check, right, wrong, capsys):
    assert check(right) is True
    assert "correct!" in capsys.readouterr().out


@pytest.mark.parametrize("check,right,wrong", CASES, ids=IDS)
def test_wrong_answer_raises(check, right, wrong):
    with pytest.raises(AssertionError):
        check(wrong)


@pytest.mark.parametrize("check,right,wrong", CASES, ids=IDS)
def test_stub_prints_not_done_yet(check, right, wrong, capsys):
    assert check(stub) is False
    out = capsys.readouterr().out
    assert "not done yet" in out and "correct!" not in out


def test_rms_norm_check_is_bit_exact_in_bf16(capsys):
    with pytest.raises(AssertionError, match="RMSNorm in bf16"):
        exercises.check_exercise_rms_norm(rms_norm_weight_before_cast)
    assert "RMSNorm in fp32: correct!" in capsys.readouterr().out


def test_wrong_shape_names_the_exercise():
    with pytest.raises(AssertionError, match=r"RMSNorm in fp32: shape \(2, 5\), expected \(2, 5, 16\)"):
        exercises.check_exercise_rms_norm(lambda x, weight, eps: rms_norm(x, weight, eps).sum(-1))


def test_next_token_check_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    exercises.check_exercise_next_token(next_token)
    torch.testing.assert_close(torch.rand(3), expected)


def test_tiny_config_overrides():
    config = exercises.tiny_config(hidden_size=48, num_attention_heads=6)
    assert (config.hidden_size, config.num_attention_heads, config.num_hidden_layers) == (48, 6, 2)


# ------------------------------------------------------------------ 08 generation: top-p
def top_p_distribution(probs, p):
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs < p
    keep = keep_sorted.scatter(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def top_p_without_the_crossing_token(probs, p):
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    keep_sorted = sorted_probs.cumsum(dim=-1) <= p
    keep_sorted[..., 0] = True
    keep = keep_sorted.scatter(-1, order, keep_sorted)
    kept = probs * keep
    return kept / kept.sum(dim=-1, keepdim=True)


def top_p_not_renormalised(probs, p):
    return top_p_distribution(probs, p) * (probs * (top_p_distribution(probs, p) > 0)).sum(-1, keepdim=True)


@pytest.mark.parametrize("wrong", [top_p_without_the_crossing_token, top_p_not_renormalised])
def test_top_p_exercise(wrong, capsys):
    assert_exercise_check(exercises.check_exercise_top_p, top_p_distribution, wrong, capsys, match="top-p")


# ------------------------------------------------------------------ 11 performance: int8 rows
def quantize_rows(weight):
    scale = weight.abs().amax(dim=1) / 127
    return torch.round(weight / scale[:, None]).to(torch.int8), scale


def quantize_per_tensor(weight):
    scale = weight.abs().max() / 127
    return torch.round(weight / scale).to(torch.int8), scale.expand(weight.shape[0])


def quantize_rows_truncating(weight):
    scale = weight.abs().amax(dim=1) / 127
    return (weight / scale[:, None]).to(torch.int8), scale


@pytest.mark.parametrize("wrong", [quantize_per_tensor, quantize_rows_truncating])
def test_int8_rows_exercise(wrong, capsys):
    assert_exercise_check(exercises.check_exercise_int8_rows, quantize_rows, wrong, capsys, match="int8 per-row")


# ------------------------------------------------------------------ 01 tokenizer: learning BPE merges
def learn_merges(pieces, num_merges):
    from minqwen.bpe import bytes_to_unicode  # the byte table only; the loop is written here

    table = bytes_to_unicode()
    counts = {}
    for piece in pieces:
        counts[piece] = counts.get(piece, 0) + 1
    words = [([table[b] for b in piece.encode("utf-8")], n) for piece, n in counts.items()]
    merges = []
    while len(merges) < num_merges:
        pair_counts = {}
        for symbols, n in words:
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] = pair_counts.get(pair, 0) + n
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair), default=None)
        if best is None or pair_counts[best] < 2:
            break
        merges.append(best)
        words = [(glue(symbols, best), n) for symbols, n in words]
    return merges


def glue(symbols, pair):
    out, i = [], 0
    while i < len(symbols):
        if tuple(symbols[i : i + 2]) == pair:
            out.append(pair[0] + pair[1])
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def learn_merges_first_tie_wins(pieces, num_merges):
    from collections import Counter

    from minqwen.bpe import bytes_to_unicode

    table = bytes_to_unicode()
    words = [([table[b] for b in piece.encode("utf-8")], n) for piece, n in Counter(pieces).items()]
    merges = []
    for _ in range(num_merges):
        pair_counts = Counter(pair for symbols, n in words for pair in zip(symbols, symbols[1:]) for _ in range(n))
        if not pair_counts or pair_counts.most_common(1)[0][1] < 2:
            break
        best = pair_counts.most_common(1)[0][0]  # ties: whichever pair was counted first
        merges.append(best)
        words = [(glue(symbols, best), n) for symbols, n in words]
    return merges


def learn_merges_ignoring_counts(pieces, num_merges):
    return learn_merges(list(dict.fromkeys(pieces)), num_merges)  # each distinct piece once


def learn_merges_never_stopping(pieces, num_merges):
    merges = learn_merges(pieces, num_merges)
    return merges + [("z", "z")] * (num_merges - len(merges))


@pytest.mark.parametrize("wrong", [learn_merges_first_tie_wins, learn_merges_ignoring_counts, learn_merges_never_stopping])
def test_learn_merges_exercise(wrong, capsys):
    assert_exercise_check(exercises.check_exercise_learn_merges, learn_merges, wrong, capsys, match="learning merges")
