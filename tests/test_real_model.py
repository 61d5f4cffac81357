"""The real Qwen2.5-Coder-0.5B-Instruct checkpoint: fetched, cached, and equal to transformers.

These tests fetch the weights on first use (491 MB, verified by sha256) into the cache; they never
skip. Transformers loads the same GGUF for the reference logits. The cache's own behaviour
(conversion once, checksums, interrupted builds) is tested on tiny files in test_gguf_hub.py.
"""

import pytest
import torch

import minqwen
from minqwen import hub

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "中国的首都是",
]


@pytest.fixture(scope="module")
def tokenizer():
    return minqwen.Tokenizer.from_pretrained(hub.DEFAULT_CHECKPOINT)


def test_greedy_paris(real_model_fp32, tokenizer):
    ids = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        for _ in range(4):
            next_id = real_model_fp32(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, next_id], dim=1)
    continuation = tokenizer.decode(ids[0, -4:].tolist())
    assert continuation.startswith(" Paris"), continuation


def test_last_position_logits_equal_transformers(real_model_fp32, hf_real_model, tokenizer):
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            ours = real_model_fp32(ids)[0, -1]
            theirs = hf_real_model(ids).logits[0, -1]
        diff = (ours - theirs).abs().max().item()
        assert diff <= 1e-3, f"{prompt!r}: max abs logit difference {diff:.2e}"


def test_bf16_picks_the_same_top1(real_model_fp32, tokenizer):
    bf16 = minqwen.from_pretrained(hub.DEFAULT_CHECKPOINT, dtype=torch.bfloat16)
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            assert bf16(ids)[0, -1].argmax() == real_model_fp32(ids)[0, -1].argmax(), prompt


def test_untied_head_and_config(real_model_fp32):
    config = real_model_fp32.config
    assert not config.tie_word_embeddings
    assert real_model_fp32.lm_head.weight.data_ptr() != real_model_fp32.model.embed_tokens.weight.data_ptr()
    assert (config.num_hidden_layers, config.hidden_size, config.num_key_value_heads) == (24, 896, 2)
    assert config.eos_token_id == [151645, 151643]
