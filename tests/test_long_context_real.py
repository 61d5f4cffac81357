"""Long context on the real Qwen2.5-Coder-0.5B-Instruct (fetched once and cached, never skipped):
YaRN and DCA keep short prompts sensible, and the passkey command finds a key across DCA chunks.
The 16K-64K passkey runs are too slow for a test; their results are in the README."""

import json

import pytest
import torch
import minqwen
from minqwen import hub, passkey

TRAINED = 32768  # the checkpoint's max_position_embeddings
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer with one word."}]


@pytest.fixture(scope="module")
def tokenizer():
    return minqwen.Tokenizer.from_pretrained(hub.DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def model():
    """Our own copy: these tests switch its position scheme, which must not leak into other tests."""
    return minqwen.from_pretrained(hub.DEFAULT_CHECKPOINT)


def answer(model, tokenizer, max_new_tokens=6):
    ids = tokenizer.apply_chat_template(QUESTION, tokenize=True)
    return tokenizer.decode(minqwen.generate(model, ids, max_new_tokens=max_new_tokens))


@pytest.mark.parametrize("method", ["rope", "yarn", "dca"])
def test_short_prompts_stay_sensible(model, tokenizer, method):
    model.extend_context(4 * TRAINED, **passkey.long_context_settings(method, TRAINED))
    assert "Paris" in answer(model, tokenizer)


def test_dca_inside_one_chunk_is_plain_rope(model, tokenizer):
    ids = torch.tensor([tokenizer.apply_chat_template(QUESTION, tokenize=True)])
    with torch.no_grad():
        plain = model.extend_context(TRAINED)(ids)
        dca = model.extend_context(4 * TRAINED, **passkey.long_context_settings("dca", TRAINED))(ids)
    diff = (dca - plain).abs().max().item()
    assert diff <= 1e-3, f"max abs logit difference {diff:.2e}"  # fp32 sums in another order than SDPA


def test_passkey_prompt(tokenizer):
    ids = passkey.passkey_prompt(tokenizer, 1000, depth=0.25, passkey="12345")
    text = tokenizer.decode(ids)
    assert 960 <= len(ids) <= 1000
    assert text.count("12345") == 2 and text.endswith("<|im_start|>assistant\nThe pass key is")
    needle, filler_end = text.index("12345"), text.index("What is the pass key?")
    assert 0.2 < needle / filler_end < 0.3
    with pytest.raises(ValueError, match="depth"):
        passkey.passkey_prompt(tokenizer, 1000, depth=1.5, passkey="12345")
    with pytest.raises(ValueError, match="too short"):
        passkey.passkey_prompt(tokenizer, 20, depth=0.5, passkey="12345")


def test_long_context_settings():
    assert passkey.long_context_settings("rope", TRAINED) == {}
    assert passkey.long_context_settings("yarn", TRAINED, factor=2.0)["rope_scaling"] == {
        "type": "yarn",
        "factor": 2.0,
        "original_max_position_embeddings": TRAINED,
    }
    assert passkey.long_context_settings("dca", TRAINED)["dual_chunk_attention_config"] == {
        "chunk_size": TRAINED,
        "local_size": TRAINED // 32,
        "original_max_position_embeddings": TRAINED,
    }
    with pytest.raises(ValueError, match="method"):
        passkey.long_context_settings("alibi", TRAINED)


def test_passkey_command_finds_the_key_across_dca_chunks(tmp_path, capsys):
    """About 700 tokens in chunks of 96: the key sits three chunks before the question."""
    results = tmp_path / "results.jsonl"
    argv = ["--length", "700", "--method", "dca", "--chunk-size", "128", "--local-size", "32", "--depth", "0.3"]
    exit_code = passkey.main([*argv, "--json", str(results)])
    printed = capsys.readouterr().out
    record = json.loads(results.read_text())
    assert exit_code == 0, printed
    assert record["found"] and record["passkey"] in record["answer"] and "found" in printed
    assert record["settings"]["dual_chunk_attention_config"]["chunk_size"] == 128
