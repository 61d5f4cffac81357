"""Chat: history, ChatML prompts, KV reuse across turns, dropping old turns; the real model answers."""

import pytest
import torch
from helpers import tiny_model_with_qwen_vocab

import minqwen
from minqwen.chat import Chat, common_prefix_length


@pytest.fixture(scope="module")
def tokenizer():
    return minqwen.Tokenizer.from_pretrained(minqwen.hub.DEFAULT_CHECKPOINT)


@pytest.fixture(scope="module")
def model():
    return tiny_model_with_qwen_vocab(seed=3)


def fresh_reply(model, tokenizer, messages, max_new_tokens):
    """The reply computed from scratch: the whole ChatML prompt, no reused cache."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return tokenizer.decode(minqwen.generate(model, prompt, max_new_tokens))


class TokenCounter:
    """Counts how many token positions the model runs (to see the KV cache being reused)."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.model.embed_tokens.register_forward_hook(self.hook)

    def hook(self, module, inputs, output):
        self.count += inputs[0].numel()


def test_reply_equals_generate_on_the_chat_template(model, tokenizer):
    chat = Chat(model, tokenizer, system="Be brief.", max_new_tokens=8)
    reply = chat.send("Hello there")
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    assert reply == fresh_reply(model, tokenizer, messages, 8)
    assert chat.messages == messages + [{"role": "assistant", "content": reply}]


def test_later_turns_reuse_the_cache_and_equal_recomputation(model, tokenizer):
    chat = Chat(model, tokenizer, max_new_tokens=6)
    counter = TokenCounter(model)
    try:
        for turn, text in enumerate(["first question", "second one", "and a third"]):
            before = counter.count
            reply = chat.send(text)
            ran = counter.count - before
            assert reply == fresh_reply(model, tokenizer, chat.messages[:-1], 6)
            prompt_len = len(tokenizer.apply_chat_template(chat.messages[:-1], tokenize=True))
            if turn:  # only the new part of the prompt runs (plus the reply's own tokens)
                assert ran < prompt_len // 2 + 6
    finally:
        counter.handle.remove()


def test_default_system_prompt_comes_from_the_template(model, tokenizer):
    chat = Chat(model, tokenizer, max_new_tokens=2)
    assert chat.messages == []
    prompt = chat.prompt_ids([{"role": "user", "content": "hi"}])
    assert tokenizer.decode(prompt).startswith("<|im_start|>system\nYou are Qwen")
    assert tokenizer.decode(prompt).endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_special_tokens_typed_by_the_user_stay_text(model, tokenizer):
    chat = Chat(model, tokenizer, max_new_tokens=2)
    prompt = chat.prompt_ids([{"role": "user", "content": "<|im_end|>"}])
    assert prompt.count(tokenizer.token_to_id("<|im_end|>")) == 2  # the system's and the user's, not the typed one


def test_oldest_turns_are_dropped_to_fit_and_the_system_prompt_stays(model, tokenizer):
    notes = []
    chat = Chat(model, tokenizer, system="Keep me.", max_new_tokens=10, context_length=90, notify=notes.append)
    for i in range(6):
        chat.send(f"message number {i} with a few words")
        prompt = tokenizer.apply_chat_template(chat.messages[:-1], tokenize=True)
        assert len(prompt) + 10 <= 90
    assert notes and all("oldest turn" in note and "90-token context" in note for note in notes)
    assert chat.messages[0] == {"role": "system", "content": "Keep me."}
    assert chat.messages[-2]["content"] == "message number 5 with a few words"
    assert len(chat.turns) < 12


def test_turn_dropping_warns_by_default(model, tokenizer):
    chat = Chat(model, tokenizer, max_new_tokens=4)
    chat.send("one two three")
    next_prompt = tokenizer.apply_chat_template(chat.messages + [{"role": "user", "content": "four"}], tokenize=True)
    chat.context_length = len(next_prompt) + 4 - 1  # one token short of keeping the first turn
    with pytest.warns(UserWarning, match="dropped the 1 oldest turn"):
        chat.send("four")
    assert [m["content"] for m in chat.messages if m["role"] == "user"] == ["four"]


def test_a_message_too_long_for_the_context_raises_and_keeps_history(model, tokenizer):
    chat = Chat(model, tokenizer, max_new_tokens=4, context_length=60)
    chat.send("short")
    before = list(chat.turns)
    with pytest.raises(ValueError, match="exceeds the 60-token context"):
        chat.send("word " * 100)
    assert chat.turns == before


def test_reset_forgets_turns_but_not_the_system_prompt(model, tokenizer):
    chat = Chat(model, tokenizer, system="S", max_new_tokens=3)
    first = chat.send("hello")
    chat.send("again")
    chat.reset()
    assert chat.messages == [{"role": "system", "content": "S"}]
    assert chat.send("hello") == first


def test_a_reply_cut_short_joins_history_and_the_next_turn_is_still_right(model, tokenizer):
    chat = Chat(model, tokenizer, max_new_tokens=12, seed=0)
    stream = chat.stream("tell me something long")
    next(iter(stream))
    del stream
    assert chat.messages[-1]["role"] == "assistant"
    assert chat.send("next") == fresh_reply(model, tokenizer, chat.messages[:-1], 12)


def test_stream_yields_the_reply_text(model, tokenizer):
    chat = Chat(model, tokenizer, max_new_tokens=8)
    stream = chat.stream("hi")
    pieces = list(stream)
    assert "".join(pieces) == chat.messages[-1]["content"] == tokenizer.decode(stream.token_ids)


def test_sampled_chat_is_reproducible_with_a_seed(model, tokenizer):
    replies = [Chat(model, tokenizer, max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5).send("hi") for _ in range(2)]
    config = minqwen.GenerationConfig(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=5)
    replies.append(Chat(model, tokenizer, generation_config=config).send("hi"))
    assert replies[0] == replies[1] == replies[2]


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(temperature=-1.0), "temperature"),
        (dict(top_p=2.0), "top_p"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(max_new_tokens=100, context_length=100), "max_new_tokens"),
        (dict(context_length=10**6), "context_length"),
    ],
)
def test_bad_settings_raise(model, tokenizer, settings, message):
    with pytest.raises(ValueError, match=message):
        Chat(model, tokenizer, **settings)


def test_empty_message_raises(model, tokenizer):
    with pytest.raises(ValueError, match="empty"):
        Chat(model, tokenizer).stream("   ")


def test_stream_counts_tokens_and_reports_speed(model, tokenizer):
    pieces = minqwen.stream(model, tokenizer, "Hello", max_new_tokens=5, stop_token_ids=[])
    assert pieces.stats() == "0 tokens in 0.00 s"
    text = pieces.text()
    assert len(pieces.token_ids) == 5 and text == tokenizer.decode(pieces.token_ids)
    assert pieces.token_ids == minqwen.generate(model, tokenizer.encode("Hello"), 5, stop_token_ids=[])
    assert pieces.text() == text and list(pieces) == []  # a finished stream just returns its text
    assert pieces.stats().startswith("5 tokens, first after") and pieces.tokens_per_second > 0
    sampled = minqwen.GenerationConfig(max_new_tokens=6, temperature=1.0, seed=2, stop_token_ids=[])
    streamed = minqwen.stream(model, tokenizer, "Hello", generation_config=sampled)
    streamed.text()
    assert streamed.token_ids == minqwen.generate(model, tokenizer.encode("Hello"), generation_config=sampled)
    with pytest.raises(ValueError, match="the prompt is empty"):
        minqwen.stream(model, tokenizer, "")
    with pytest.raises(ValueError, match="one prompt"):
        minqwen.stream(model, tokenizer, [[1, 2], [3]])


def test_common_prefix_length():
    assert common_prefix_length([1, 2, 3], [1, 2, 4, 5]) == 2
    assert common_prefix_length([], [1]) == 0
    assert common_prefix_length([1, 2], [1, 2]) == 2


def test_real_model_remembers_the_conversation(real_model_fp32, tokenizer):
    chat = Chat(real_model_fp32, tokenizer, max_new_tokens=24)
    chat.send("My name is Ada. Reply with just: OK")
    assert "Ada" in chat.send("What is my name? Answer in one short sentence.")
    assert chat.turns[-1]["role"] == "assistant" and chat.turns[-1]["content"]
    assert torch.is_grad_enabled()
