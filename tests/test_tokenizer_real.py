"""The real Qwen2.5-Coder tokenizer: both backends give HF-identical ids, the chat template matches.

The checkpoint is fetched into the cache on first use (never skipped). The reference is HF
``tokenizers`` / ``transformers`` (test-only) on the same tokenizer files, which carry the
official Qwen2 NFC normalizer.
"""

from __future__ import annotations

import json
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minqwen import hub
from minqwen.bpe import tiktoken_compatible
from minqwen.tokenizer import Tokenizer
from benchmarks.tokenizer_bench import build_corpus, run_benchmark

CONVERSATIONS = [
    ([{"role": "user", "content": "Write a haiku about tokenizers."}], True),
    ([{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}], True),
    (
        [
            {"role": "system", "content": "You write Python."},
            {"role": "user", "content": "Reverse a list."},
            {"role": "assistant", "content": "```python\nxs[::-1]\n```"},
            {"role": "user", "content": "In place?"},
        ],
        False,
    ),
    (
        [
            {"role": "user", "content": "你好！今天怎么样？ 🙂"},
            {"role": "assistant", "content": "很好，谢谢。مرحبا नमस्ते"},
            {"role": "user", "content": "Ça va? e\u0301\r\n\ttab"},
        ],
        True,
    ),
    ([{"role": "user", "content": "Hi"}, {"role": "system", "content": "Late system note."}], False),
]


@pytest.fixture(scope="module")
def directory():
    return hub.resolve(hub.DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module", params=["tiktoken", "python"])
def tokenizer(request, directory) -> Tokenizer:
    return Tokenizer.from_pretrained(directory, backend=request.param)


@pytest.fixture(scope="module")
def hf(directory):
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_file(str(directory / "tokenizer.json"))


@pytest.fixture(scope="module")
def hf_without_added_tokens(directory):
    """HF with no added tokens: what "special tokens are ordinary text" means, as a reference."""
    from tokenizers import Tokenizer as HFTokenizer

    data = json.loads((directory / "tokenizer.json").read_text(encoding="utf-8"))
    return HFTokenizer.from_str(json.dumps({**data, "added_tokens": []}))


@pytest.fixture(scope="module")
def hf_auto(directory):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(directory)


@pytest.fixture(scope="module")
def corpus() -> str:
    text = build_corpus(210_000)
    assert len(text.encode("utf-8")) >= 200_000
    return text


def assert_same_ids(ours: list[int], reference: list[int], tokenizer: Tokenizer) -> None:
    """Equal id lists, or a message showing the first place they part."""
    if ours != reference:
        i = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b), min(len(ours), len(reference)))
        raise AssertionError(
            f"ids differ at position {i}: ours {ours[i:i + 6]} = {tokenizer.decode(ours[i:i + 6])!r}, "
            f"HF {reference[i:i + 6]} = {tokenizer.decode(reference[i:i + 6])!r} (after {tokenizer.decode(ours[max(0, i - 6):i])!r})"
        )


def test_the_loaded_tokenizer_is_qwens(tokenizer, hf_auto):
    assert tokenizer.vocab_size == hf_auto.vocab_size == 151643
    assert len(tokenizer) == len(hf_auto) == 151665
    assert tokenizer.special_tokens == {token: hf_auto.convert_tokens_to_ids(token) for token in tokenizer.special_tokens}
    assert tokenizer.special_tokens["<|im_end|>"] == 151645 and tokenizer.special_tokens["<|endoftext|>"] == 151643
    assert tokenizer.eos_token_id == hf_auto.eos_token_id == 151645
    assert tokenizer.pad_token_id == hf_auto.pad_token_id == 151643
    assert tokenizer.eos_token_ids == [151645, 151643]
    assert tokenizer.nfc and tokenizer.encode("Hello world") == [9707, 1879]
    for token_id in (0, 220, 9707, 151642, 151644, 151657):
        assert tokenizer.id_to_token(token_id) == hf_auto.convert_ids_to_tokens(token_id)
        assert tokenizer.token_to_id(tokenizer.id_to_token(token_id)) == token_id


def test_auto_picks_tiktoken_and_the_exhaustive_check_agrees(directory):
    tokenizer = Tokenizer.from_pretrained(directory)
    assert tokenizer.backend == "tiktoken"
    assert tiktoken_compatible(tokenizer.vocab, tokenizer.merges, exhaustive=True)


def test_corpus_ids_equal_hf_with_special_tokens(tokenizer, hf, corpus):
    assert_same_ids(tokenizer.encode(corpus, allowed_special="all"), hf.encode(corpus).ids, tokenizer)


def test_corpus_ids_equal_hf_with_special_tokens_as_text(tokenizer, hf_without_added_tokens, corpus):
    ids = tokenizer.encode(corpus)
    assert_same_ids(ids, hf_without_added_tokens.encode(corpus).ids, tokenizer)
    assert not set(ids) & set(tokenizer.special_tokens.values())
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", corpus)


def test_a_subset_of_special_tokens(tokenizer, hf):
    text = "<|im_start|>user\nhi<|im_end|><|endoftext|>"
    ids = tokenizer.encode(text, allowed_special={"<|im_start|>", "<|im_end|>"})
    assert ids[0] == 151644 and 151645 in ids and 151643 not in ids
    assert tokenizer.decode(ids) == text


TEXTS = st.text(max_size=80) | st.lists(
    st.sampled_from(["<|im_end|>", "<|im_start|>", "<tool_call>", " ", "  ", "\t", "\r\n", "\n\n", "'ll", "'S", "e\u0301", "👍🏽", "‍", "123", "中文", "ab"]),
    max_size=12,
).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(TEXTS)
def test_any_text_equals_hf_and_round_trips_to_nfc(tokenizer, hf, text):
    ids = tokenizer.encode(text, allowed_special="all")
    assert_same_ids(ids, hf.encode(text).ids, tokenizer)
    assert tokenizer.decode(ids) == unicodedata.normalize("NFC", text)
    assert tokenizer.decode(tokenizer.encode(text)) == unicodedata.normalize("NFC", text)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(0, 151664), max_size=12))
def test_any_ids_decode_like_hf_even_when_not_utf8(tokenizer, hf, ids):
    assert tokenizer.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    stream = tokenizer.stream_decoder()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tokenizer.decode(ids)


def test_stream_decoder_on_real_multibyte_tokens(tokenizer):
    ids = tokenizer.encode("🧑🏽‍🚀 ok")
    stream = tokenizer.stream_decoder()
    pieces = [stream.push(i) for i in ids]
    assert "" in pieces  # an emoji spans several tokens: nothing until it is complete
    assert "".join(pieces) + stream.flush() == "🧑🏽‍🚀 ok"
    assert all("\ufffd" not in piece for piece in pieces)


@pytest.mark.parametrize("messages, add_generation_prompt", CONVERSATIONS)
def test_chat_template_equals_transformers(tokenizer, hf_auto, messages, add_generation_prompt):
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    expected = hf_auto.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    assert text == expected
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == hf_auto(expected, add_special_tokens=False)["input_ids"]


def test_chat_default_system_prompt_is_qwen25s(tokenizer):
    assert tokenizer.default_system_prompt() == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."


def test_benchmark_runs_all_backends_on_the_same_ids(directory):
    results = run_benchmark(str(directory), megabytes=0.05, repeats=1)
    assert [r.name for r in results] == ["minqwen tiktoken", "minqwen python (one pass)", "HF tokenizers (1 thread)"]
    assert all(r.mb_per_s > 0 for r in results)
