"""The decoding fast paths compute what their readable twins compute (fp32 <= 1e-5)."""

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close

from minqwen.attention import causal_mask, decode_attention, eager_attention, sdpa_attention

HEADS = [(4, 4), (4, 2), (4, 1), (6, 2)]


def one_token_attention_inputs(heads: int, kv_heads: int, keys: int = 9, batch: int = 2, head_dim: int = 8):
    """q (B, H, 1, D) and k, v (B, KV, S, D) slices of a longer buffer, as a KV cache hands them over."""
    generator = torch.Generator().manual_seed(heads * 10 + kv_heads)
    q = torch.randn(batch, heads, 1, head_dim, generator=generator)
    buffer = torch.randn(2, batch, kv_heads, keys + 5, head_dim, generator=generator)
    return q, buffer[0, :, :, :keys], buffer[1, :, :, :keys]


@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_decode_attention_equals_eager_and_gqa_sdpa(heads, kv_heads):
    q, k, v = one_token_attention_inputs(heads, kv_heads)
    got = decode_attention(q, k, v, None, 0.3)
    assert got.shape == q.shape
    assert_close(got, eager_attention(q, k, v, None, 0.3)[0])
    assert_close(got, F.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True))
    assert_close(sdpa_attention(q, k, v, None, 0.3), got)  # sdpa_attention routes one token here


@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_decode_attention_with_padding_and_window_masks_equals_eager(heads, kv_heads):
    q, k, v = one_token_attention_inputs(heads, kv_heads)
    padding = torch.ones(2, 9, dtype=torch.long)
    padding[1, :4] = 0  # row 1 is left-padded: its first 4 keys are hidden
    for mask in (causal_mask(1, 9, attention_mask=padding), causal_mask(1, 9, sliding_window=3)):
        assert mask.shape[-2:] == (1, 9)
        got = decode_attention(q, k, v, mask, 0.3)
        assert_close(got, eager_attention(q, k, v, mask, 0.3)[0])
        # and the padded keys really are ignored: changing them changes nothing
        v2 = v.clone()
        v2[..., ~mask[-1, 0, 0], :] += 100.0
        assert_close(decode_attention(q, k, v2, mask, 0.3)[-1], got[-1])
