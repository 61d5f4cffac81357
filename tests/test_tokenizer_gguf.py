"""GGUF tokenizer metadata -> HF tokenizer files that HF ``tokenizers`` and transformers load."""

from __future__ import annotations

import json

import pytest
from gguf_fixtures import byte_level_vocab

from minqwen.bpe import QWEN2_PATTERN
from minqwen.loading.gguf import tokenizer_files_from_gguf

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
TEMPLATE_WITH_SYSTEM = "{%- if messages[0].role != 'system' %}{{- '<|im_start|>system\\nYou are tiny.<|im_end|>\\n' }}{%- endif %}" + TEMPLATE


def tiny_metadata() -> dict:
    """Qwen's layout in small: 256 byte symbols, 2 merged tokens, added tokens, one unused row."""
    byte_symbols = byte_level_vocab(257)[0][:256]
    tokens = byte_symbols + ["Ġt", "he", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "[PAD262]"]
    types = [1] * 258 + [3, 3, 3, 4, 5]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": ["Ġ t", "h e"],
        "tokenizer.ggml.eos_token_id": 260,
        "tokenizer.ggml.padding_token_id": 258,
        "tokenizer.ggml.bos_token_id": 258,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": TEMPLATE,
    }


def test_files_have_the_official_qwen2_pipeline():
    files = tokenizer_files_from_gguf(tiny_metadata())
    tokenizer = json.loads(files["tokenizer.json"])
    assert tokenizer["normalizer"] == {"type": "NFC"}
    split, byte_level = tokenizer["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"] == {"Regex": QWEN2_PATTERN} and split["behavior"] == "Isolated"
    assert byte_level["type"] == tokenizer["decoder"]["type"] == "ByteLevel"
    assert tokenizer["model"]["merges"] == [["Ġ", "t"], ["h", "e"]]
    assert len(tokenizer["model"]["vocab"]) == 258  # 256 bytes + 2 merged tokens; no added, no unused
    added = {t["content"]: (t["id"], t["special"]) for t in tokenizer["added_tokens"]}
    assert added == {"<|endoftext|>": (258, True), "<|im_start|>": (259, True), "<|im_end|>": (260, True), "<tool_call>": (261, False)}


def test_config_names_special_tokens_and_keeps_the_template():
    config = json.loads(tokenizer_files_from_gguf(tiny_metadata())["tokenizer_config.json"])
    assert (config["eos_token"], config["pad_token"], config["bos_token"]) == ("<|im_end|>", "<|endoftext|>", "<|endoftext|>")
    assert config["add_bos_token"] is False
    assert config["chat_template"] == TEMPLATE
    assert config["added_tokens_decoder"]["261"] == {
        "content": "<tool_call>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": False,
    }


def test_hf_tokenizers_and_transformers_load_the_files(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    for name, text in tokenizer_files_from_gguf(tiny_metadata()).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    hf = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert hf.encode(" the<|im_end|>").ids == [256, 257, 260]  # "Ġt" "he" <|im_end|>
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert auto.eos_token_id == 260 and auto.pad_token_id == 258
    assert auto.decode([256, 257, 261]) == " the<tool_call>"
    chat = auto.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n"


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("tokenizer.ggml.model", "llama", "'llama'; only byte-level BPE"),
        ("tokenizer.ggml.pre", "llama-bpe", "'llama-bpe'; supported: qwen2"),
        ("tokenizer.ggml.merges", ["Ġ t", "he"], "merges[1] = 'he'"),
        ("tokenizer.ggml.eos_token_id", 9999, "eos_token_id = 9999 is outside the vocabulary of 263"),
        ("tokenizer.ggml.token_type", [1, 1], "263 tokens but 2 token types"),
    ],
)
def test_bad_metadata_is_named(key, value, message):
    metadata = tiny_metadata() | {key: value}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        tokenizer_files_from_gguf(metadata)


def test_missing_key_is_named():
    metadata = tiny_metadata()
    del metadata["tokenizer.ggml.merges"]
    with pytest.raises(ValueError, match="no 'tokenizer.ggml.merges'"):
        tokenizer_files_from_gguf(metadata)


# ---------------------------------------------------------------------------- whole files
@pytest.fixture
def tiny_gguf(tmp_path, monkeypatch):
    """A tiny Qwen2 GGUF with a 300-token vocabulary (two merges), and an empty private cache."""
    from gguf_fixtures import write_tiny_gguf
    from helpers import random_model, tiny_config

    monkeypatch.setenv("MINQWEN_CACHE", str(tmp_path / "cache"))
    write_tiny_gguf(random_model(tiny_config(vocab_size=300, head_size=16)), tmp_path / "tiny.gguf")
    return tmp_path / "tiny.gguf"


def test_a_tokenizer_from_a_gguf_writes_only_tokenizer_files(tiny_gguf, tmp_path):
    from minqwen import Tokenizer

    tokenizer = Tokenizer.from_pretrained(tiny_gguf)
    assert tokenizer.encode(" the<|endoftext|>", allowed_special="all") == [257, 258, 256]  # "Ġt" "he" <|endoftext|>
    written = sorted(str(p.relative_to(tmp_path / "cache")) for p in (tmp_path / "cache").rglob("*") if p.is_file())
    (directory,) = (tmp_path / "cache" / "tokenizers").iterdir()
    assert [w for w in written if not w.startswith("locks")] == [f"tokenizers/{directory.name}/{name}" for name in ("tokenizer.json", "tokenizer_config.json")]


def test_a_tokenizer_saved_by_transformers_loads(tiny_gguf, tmp_path):
    from transformers import AutoTokenizer

    from minqwen import Tokenizer

    saved = tmp_path / "saved by transformers"
    written = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    written.chat_template = TEMPLATE_WITH_SYSTEM  # transformers 5 writes it to chat_template.jinja
    written.save_pretrained(saved)
    vocab = json.loads((saved / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert vocab["<|endoftext|>"] == 256, "transformers lists the special token in the vocabulary too"
    reference = AutoTokenizer.from_pretrained(saved)
    ours = Tokenizer.from_pretrained(saved)
    text = " the theme<|endoftext|> héllo"
    assert ours.encode(text, allowed_special="all") == reference(text)["input_ids"]
    assert ours.decode(ours.encode(text, allowed_special="all")) == text
    messages = [{"role": "user", "content": "hi"}]
    chat = ours.apply_chat_template(messages, add_generation_prompt=False)
    assert chat == reference.apply_chat_template(messages, tokenize=False) and chat.startswith("<|im_start|>system\nYou are tiny.")


def test_one_name_with_two_ids_is_still_an_error():
    from minqwen.tokenizer import AddedToken, Tokenizer

    vocab = dict(zip(byte_level_vocab(257)[0][:256], range(256)))
    with pytest.raises(ValueError, match="'<\\|endoftext\\|>' has two ids: 300 and 256"):
        Tokenizer(vocab | {"<|endoftext|>": 300}, [], [AddedToken(256, "<|endoftext|>")])
    with pytest.raises(ValueError, match="'<\\|endoftext\\|>' has two ids: 256 and 257"):
        Tokenizer(vocab, [], [AddedToken(256, "<|endoftext|>"), AddedToken(257, "<|endoftext|>")])
