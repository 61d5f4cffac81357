"""A conversation with an instruct model: history, ChatML prompts, streamed replies.

Instruct checkpoints were fine-tuned on conversations written in ChatML::

    <|im_start|>system
    You are a helpful assistant.<|im_end|>
    <|im_start|>user
    Hi!<|im_end|>
    <|im_start|>assistant
    Hello! How can I help?<|im_end|>

The tokenizer's chat template writes that text; the model continues after
``<|im_start|>assistant\\n`` and ends its turn with ``<|im_end|>`` (a stop id). Every turn the
whole conversation is the prompt -- but it starts with the previous turn's prompt and reply,
whose keys and values are still in the KV cache, so only the new tokens are computed. When the
conversation outgrows the context, the oldest turns are dropped (the system prompt never is).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, Iterator, Protocol

from .cache import KVCache
from .generate import (
    GenerationStep,
    IncrementalDecoder,
    TextStream,
    context_length,
    fit_to_context,
    generate_steps,
    generation_config_for,
)
from .model import Qwen2ForCausalLM
from .sampling import GenerationConfig

DEFAULT_CHAT_MAX_NEW_TOKENS = 512
Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}


class ChatTokenizer(Protocol):
    """What :class:`Chat` needs from a tokenizer (``minqwen.Tokenizer`` has it)."""

    def decode(self, ids: list[int]) -> str: ...

    def stream_decoder(self) -> IncrementalDecoder: ...

    def apply_chat_template(
        self, messages: list[Message], add_generation_prompt: bool = True, tokenize: bool = False
    ) -> str | list[int]: ...


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading ids ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def warn(message: str) -> None:
    """Default way for :class:`Chat` to say it dropped turns: a ``UserWarning``."""
    warnings.warn(message, stacklevel=4)


class Chat:
    """Talk to ``model``: ``chat.send("Hi")`` returns the reply, ``chat.stream("Hi")`` streams it.

    system: the system prompt (None: the chat template's default). The settings of every reply
    are a :class:`~minqwen.GenerationConfig` plus keyword shorthands, as in
    :func:`minqwen.generate` (greedy by default, replies of up to 512 tokens; with a ``seed``,
    each reply's draws start from it, so a conversation replays exactly). context_length: tokens
    the conversation may use (default: the model's context); each prompt leaves room for
    ``max_new_tokens`` of reply, and when it would not, the oldest user/assistant turns are
    dropped and ``notify`` is told why (default: a ``UserWarning``).
    """

    def __init__(
        self,
        model: Qwen2ForCausalLM,
        tokenizer: ChatTokenizer,
        system: str | None = None,
        max_new_tokens: int | None = None,
        *,
        generation_config: GenerationConfig | None = None,
        context_length: int | None = None,
        notify: Callable[[str], None] = warn,
        **settings: Any,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.system = system
        self.generation_config = generation_config_for(
            generation_config, DEFAULT_CHAT_MAX_NEW_TOKENS, max_new_tokens=max_new_tokens, **settings
        )
        self.context_length = check_context_length(model, context_length)
        if not 0 < self.max_new_tokens < self.context_length:
            raise ValueError(
                f"max_new_tokens must be between 1 and context_length - 1 = {self.context_length - 1}, got {self.max_new_tokens}"
            )
        self.notify = notify
        self.turns: list[Message] = []  # user and assistant messages, oldest first
        self._cache: KVCache | None = None  # keys/values of ``_cached_ids``, reused next turn
        self._cached_ids: list[int] = []

    @property
    def max_new_tokens(self) -> int:
        """The longest reply, in tokens (``generation_config.max_new_tokens``)."""
        return self.generation_config.max_new_tokens

    @property
    def messages(self) -> list[Message]:
        """The conversation as the chat template sees it (system prompt first, if any)."""
        system = [{"role": "system", "content": self.system}] if self.system is not None else []
        return system + self.turns

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.turns = []

    def send(self, text: str) -> str:
        """Add a user message, generate the whole reply and return it."""
        return self.stream(text).text()

    def stream(self, text: str) -> TextStream:
        """Add a user message; iterate the result for the reply's text as it is generated.

        The reply joins the history when the stream ends -- also when it is cut short, so the
        history shows what was said.
        """
        if not isinstance(text, str) or not text.strip():
            raise ValueError("the message is empty: type something for the model to answer")
        user = {"role": "user", "content": text}
        prompt = self.fit_prompt(user)
        max_new = fit_to_context(self.model, [prompt], self.max_new_tokens)
        cache = self.reusable_cache(prompt, len(prompt) + max_new)
        steps = generate_steps(self.model, [prompt], max_new, generation_config=self.generation_config, cache=cache)
        return TextStream(self._remember(steps, user, prompt, cache), self.tokenizer)

    # ------------------------------------------------------------------ prompt and history
    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """Token ids of the ChatML prompt for ``messages``, ending with the assistant header.

        The template places the special tokens itself, so "<|im_end|>" typed in a message stays text.
        """
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True))

    def fit_prompt(self, user: Message) -> list[int]:
        """The prompt for history + ``user``, dropping the oldest turns until the reply fits."""
        budget = self.context_length - self.max_new_tokens
        system = self.messages[: len(self.messages) - len(self.turns)]
        turns = self.turns
        prompt = self.prompt_ids(system + turns + [user])
        while len(prompt) > budget and turns:
            turns = turns[2:]  # one user message and its reply
            prompt = self.prompt_ids(system + turns + [user])
        if len(prompt) > budget:
            raise ValueError(
                f"the message needs {len(prompt)} tokens with the system prompt; with {self.max_new_tokens} "
                f"kept for the reply that exceeds the {self.context_length}-token context"
            )
        if len(turns) < len(self.turns):
            dropped = (len(self.turns) - len(turns)) // 2
            self.notify(f"dropped the {dropped} oldest turn(s) to fit the {self.context_length}-token context")
            self.turns = turns
        return prompt

    def _remember(
        self, steps: Iterator[GenerationStep], user: Message, prompt: list[int], cache: KVCache
    ) -> Iterator[GenerationStep]:
        """Pass the steps through; at the end record the turn and what the cache now holds."""
        reply: list[int] = []
        try:
            for step in steps:
                if step.token_ids[0] is not None:
                    reply.append(step.token_ids[0])
                yield step
        finally:
            self.turns += [user, {"role": "assistant", "content": self.tokenizer.decode(reply)}]
            self._cached_ids = (prompt + reply)[: cache.length]

    # ------------------------------------------------------------------ KV cache reuse
    def reusable_cache(self, prompt: list[int], needed: int) -> KVCache:
        """A cache holding the longest prefix of ``prompt`` computed before, with room for ``needed``.

        At least the prompt's last token is left to run, since its logits give the first reply
        token. The cache grows (copying what it holds) when a turn needs more room.
        """
        keep = min(common_prefix_length(self._cached_ids, prompt), len(prompt) - 1)
        if self._cache is None:
            self._cache = self.model.make_cache(1, min(needed, self.context_length))
        self._cache.truncate(keep)  # forget what lies after the shared prefix
        if self._cache.max_seq_len < needed:  # grow by doubling, so growing is rare
            self._cache = self._cache.resized(min(max(needed, 2 * self._cache.max_seq_len), self.context_length))
        return self._cache


def check_context_length(model: Qwen2ForCausalLM, requested: int | None) -> int:
    """The chat's context: ``requested`` if it is a positive int within the model's, else its own."""
    limit = context_length(model)
    if requested is None:
        return limit
    if not isinstance(requested, int) or isinstance(requested, bool) or not 0 < requested <= limit:
        raise ValueError(f"context_length must be an integer in [1, {limit}] (the model's context), got {requested!r}")
    return requested
