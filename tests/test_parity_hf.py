"""minqwen equals HF transformers' Qwen2, module by module and end to end (fp32 <= 1e-5)."""

import pytest
import torch
from helpers import assert_close, hf_config, hf_twin, random_model, randomize_, tiny_config

from minqwen.attention import Qwen2Attention
from minqwen.mlp import Qwen2MLP
from minqwen.model import Qwen2DecoderLayer
from minqwen.norm import RMSNorm
from minqwen.rope import RotaryEmbedding, apply_rotary

transformers = pytest.importorskip("transformers", reason="transformers is in requirements-dev.txt")
from transformers.models.qwen2 import modeling_qwen2 as hf_qwen2  # noqa: E402

HEADS = [(4, 4), (4, 2), (4, 1), (6, 2)]


def test_rmsnorm_matches_hf():
    ours = randomize_(RMSNorm(48, eps=1e-5))
    theirs = hf_qwen2.Qwen2RMSNorm(48, eps=1e-5)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 17, 48) * 3
    assert_close(ours(x), theirs(x))
    xb = x.bfloat16()
    assert_close(ours.bfloat16()(xb), theirs.bfloat16()(xb), torch.bfloat16)


@pytest.mark.parametrize("head_dim", [8, 6, 64])
def test_rotary_matches_hf(head_dim):
    config = tiny_config(head_size=head_dim, rope_theta=1e6)
    positions = torch.tensor([[0, 1, 2, 100, 4000], [7, 8, 9, 10, 11]])
    cos, sin = RotaryEmbedding(config)(positions, torch.float32)
    hf_cos, hf_sin = hf_qwen2.Qwen2RotaryEmbedding(hf_config(config))(torch.zeros(1), positions)
    assert_close(cos, hf_cos)
    assert_close(sin, hf_sin)
    q, k = torch.randn(2, 4, 5, head_dim), torch.randn(2, 2, 5, head_dim)
    hf_q, hf_k = hf_qwen2.apply_rotary_pos_emb(q, k, cos, sin)
    assert_close(apply_rotary(q, cos, sin), hf_q)
    assert_close(apply_rotary(k, cos, sin), hf_k)


def _hf_causal_mask(seq: int) -> torch.Tensor:
    """HF's additive mask format: 0 where visible, a large negative number elsewhere."""
    visible = torch.ones(seq, seq, dtype=torch.bool).tril()
    return torch.zeros(1, 1, seq, seq).masked_fill(~visible, torch.finfo(torch.float32).min)


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_attention_and_block_match_hf(heads, kv_heads, implementation):
    config = tiny_config(heads, kv_heads)
    x = torch.randn(2, 17, config.hidden_size)
    positions = torch.arange(17).expand(2, 17)
    cos, sin = RotaryEmbedding(config)(positions, torch.float32)
    mask = torch.ones(17, 17, dtype=torch.bool).tril()[None, None]
    hf_mask = _hf_causal_mask(17)

    ours = randomize_(Qwen2Attention(config, 0, implementation)).eval()
    theirs = hf_qwen2.Qwen2Attention(hf_config(config), 0).eval()
    theirs.load_state_dict(ours.state_dict())
    assert_close(ours(x, cos, sin, mask), theirs(x, (cos, sin), hf_mask)[0])

    ours_block = randomize_(Qwen2DecoderLayer(config, 0, implementation), seed=1).eval()
    theirs_block = hf_qwen2.Qwen2DecoderLayer(hf_config(config), 0).eval()
    theirs_block.load_state_dict(ours_block.state_dict())
    assert_close(ours_block(x, cos, sin, mask), theirs_block(x, attention_mask=hf_mask, position_embeddings=(cos, sin)))


def test_mlp_matches_hf():
    config = tiny_config()
    ours = randomize_(Qwen2MLP(config))
    theirs = hf_qwen2.Qwen2MLP(hf_config(config))
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 17, config.hidden_size)
    assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("heads,kv_heads", HEADS)
@pytest.mark.parametrize("tied", [False, True])
def test_whole_model_logits_match_hf(heads, kv_heads, tied):
    config = tiny_config(heads, kv_heads, tied=tied)
    model = random_model(config)
    hf = hf_twin(model)
    input_ids = torch.randint(0, config.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(model(input_ids), hf(input_ids).logits)


def test_odd_head_dim_model_matches_hf():
    config = tiny_config(6, 2, head_dim=6, hidden_size=40)  # head_dim 6 given explicitly, 6*6 != 40
    model = random_model(config)
    input_ids = torch.randint(0, config.vocab_size, (2, 17))
    with torch.no_grad():
        assert_close(model(input_ids), hf_twin(model)(input_ids).logits)


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_bf16_model_close_to_hf(implementation):
    config = tiny_config(4, 2)
    model = random_model(config, attn_implementation=implementation).bfloat16()
    hf = hf_twin(model, implementation)  # fused kernels round differently from eager in bf16
    input_ids = torch.randint(0, config.vocab_size, (2, 17))
    with torch.no_grad():
        assert_close(model(input_ids), hf(input_ids).logits, torch.bfloat16)


def test_tied_model_shares_one_tensor():
    model = random_model(tiny_config(tied=True))
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert set(model.state_dict()) == set(hf_twin(model).state_dict())
