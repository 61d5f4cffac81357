"""Generation with the real Qwen2.5-Coder-0.5B-Instruct weights (fetched once, cached; never skipped).

The reference is transformers' ``generate(do_sample=False)`` on its own reading of the same GGUF.
"""

import pytest
import torch

import minqwen
from minqwen.generate import generate_steps

PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "中国的首都是"]


@pytest.fixture(scope="module")
def tokenizer():
    return minqwen.Tokenizer.from_pretrained(minqwen.hub.DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer.encode(p) for p in PROMPTS]


def test_greedy_32_tokens_equal_transformers(real_model_fp32, hf_real_model, prompt_ids):
    for ids in prompt_ids:
        ours = minqwen.generate(real_model_fp32, ids, max_new_tokens=32, stop_token_ids=[])
        with torch.no_grad():
            theirs = hf_real_model.generate(
                torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert ours == theirs[0, len(ids) :].tolist()


def test_cached_decoding_equals_recomputation(real_model_fp32, prompt_ids):
    cached = list(generate_steps(real_model_fp32, prompt_ids[:1], 8, stop_token_ids=[]))
    recomputed = list(generate_steps(real_model_fp32, prompt_ids[:1], 8, stop_token_ids=[], use_cache=False))
    assert [s.token_ids for s in cached] == [s.token_ids for s in recomputed]
    diff = (torch.stack([s.logits for s in cached]) - torch.stack([s.logits for s in recomputed])).abs().max()
    assert diff < 1e-3, f"cached and recomputed logits differ by {diff:.2e}"


def test_batched_greedy_equals_each_prompt_alone(real_model_fp32, prompt_ids):
    batched = minqwen.generate(real_model_fp32, prompt_ids, max_new_tokens=16, stop_token_ids=[])
    alone = [minqwen.generate(real_model_fp32, ids, max_new_tokens=16, stop_token_ids=[]) for ids in prompt_ids]
    assert batched == alone


def test_stream_pieces_join_to_the_decoded_text(real_model_fp32, tokenizer):
    pieces = minqwen.stream(real_model_fp32, tokenizer, "中国的首都是", max_new_tokens=12, stop_token_ids=[])
    text = "".join(pieces)
    assert "\ufffd" not in text  # incomplete UTF-8 is held back, never shown as a replacement char
    assert text == tokenizer.decode(pieces.token_ids)
    assert pieces.token_ids == minqwen.generate(real_model_fp32, tokenizer.encode("中国的首都是"), 12, stop_token_ids=[])
    assert "北京" in text


def test_instruct_model_stops_at_im_end(real_model_fp32, tokenizer):
    messages = [{"role": "user", "content": "Reply with the single word: yes"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=True)
    reply = minqwen.generate(real_model_fp32, prompt, max_new_tokens=20)
    assert len(reply) < 20, "the reply should end with <|im_end|> (a default stop id) well before 20 tokens"
    assert tokenizer.decode(reply).strip().lower().startswith("yes")
