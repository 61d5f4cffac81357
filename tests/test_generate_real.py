"""Generation with the real Qwen2.5-Coder-0.5B-Instruct weights (fetched once, cached; never skipped).

One end-to-end check: greedy decoding equals transformers' ``generate(do_sample=False)`` on its
own reading of the same GGUF. The mechanics (KV cache vs recomputation, batches, stop ids,
streaming) are proven on tiny models in test_generate.py and test_chat.py.
"""

import torch

import minqwen

PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "中国的首都是"]


def test_greedy_32_tokens_equal_transformers(real_model_fp32, hf_real_model):
    tokenizer = minqwen.Tokenizer.from_pretrained(minqwen.hub.DEFAULT_CHECKPOINT)
    for prompt in PROMPTS:
        ids = tokenizer.encode(prompt)
        ours = minqwen.generate(real_model_fp32, ids, max_new_tokens=32, stop_token_ids=[])
        with torch.no_grad():
            theirs = hf_real_model.generate(
                torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert ours == theirs[0, len(ids) :].tolist(), prompt
