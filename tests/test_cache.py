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
    assert cache.nbytes() == 10 * 2 * config.num_hidden_layers * 1 * config.head_size * 4


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
