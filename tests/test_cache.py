"""KV cache: prefill then token-by-token decoding gives the logits of one full forward."""

import pytest
import torch
from helpers import assert_close, random_model, tiny_config


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 1), (6, 2)])
def test_prefill_then_decode_equals_full_forward(implementation, heads, kv_heads):
    model = random_model(tiny_config(heads, kv_heads), attn_implementation=implementation)
    input_ids = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(input_ids)
        cache = model.make_cache(batch_size=2, max_seq_len=24)
        pieces = [model(input_ids[:, :12], cache=cache)]
        pieces += [model(input_ids[:, t : t + 1], cache=cache) for t in range(12, 20)]
    assert cache.length == 20
    assert_close(torch.cat(pieces, dim=1), full)


def test_cache_size_follows_gqa():
    config = tiny_config(4, 1)
    cache = random_model(config).make_cache(batch_size=1, max_seq_len=10)
    # 2 (K and V) * layers * kv_heads * head_dim * 4 bytes per token
    assert cache.nbytes() == 10 * 2 * config.num_hidden_layers * 1 * config.head_dim * 4


def test_full_cache_raises():
    model = random_model(tiny_config())
    cache = model.make_cache(batch_size=1, max_seq_len=4)
    with pytest.raises(ValueError, match="max_seq_len=4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_bad_input_ids_are_rejected():
    model = random_model(tiny_config())
    with pytest.raises(ValueError, match="vocab_size=257"):
        model(torch.tensor([[1, 300]]))
    with pytest.raises(ValueError, match="shape"):
        model(torch.tensor([1, 2]))


def test_truncate_then_continue_equals_full_forward_of_the_new_sequence():
    model = random_model(tiny_config(4, 2))
    first, second = torch.randint(0, 257, (2, 1, 14), generator=torch.Generator().manual_seed(1))
    second[:, :6] = first[:, :6]  # the two sequences share a prefix of 6 tokens
    with torch.no_grad():
        cache = model.make_cache(batch_size=1, max_seq_len=14)
        model(first, cache=cache)
        cache.truncate(6)
        rest = model(second[:, 6:], cache=cache)
        assert_close(rest, model(second)[:, 6:])
    with pytest.raises(ValueError, match="holding 14 tokens to 15"):
        cache.truncate(15)


def test_resized_cache_holds_a_copy_and_has_more_room():
    model = random_model(tiny_config(4, 1))
    ids = torch.randint(0, 257, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        small = model.make_cache(batch_size=1, max_seq_len=8)
        model(ids[:, :8], cache=small)
        big = small.resized(12)
        assert (big.max_seq_len, big.length, small.max_seq_len) == (12, 8, 8)
        assert_close(model(ids[:, 8:], cache=big), model(ids)[:, 8:])
        assert small.length == 8  # the original is untouched
    with pytest.raises(ValueError, match="cannot hold the 8"):
        small.resized(7)
