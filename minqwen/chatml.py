"""ChatML, the chat format of Qwen2 and Qwen2.5: the template as text segments, and message checks.

A conversation becomes ``<|im_start|>role\ncontent<|im_end|>\n`` per message, plus
``<|im_start|>assistant\n`` when the model should answer. :func:`chat_segments` returns it as
(text, is_special_token) pieces, so a tokenizer can place the special tokens structurally while
"<|im_end|>" typed inside a message stays ordinary text. The segments equal what the checkpoint's
Jinja template renders (tested against transformers), without a template engine.
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

# The Qwen2.5 template's tool-calling branches are not reproduced: these roles are.
CHAT_ROLES = ("system", "user", "assistant")
# A default system prompt written into a ChatML template as a literal, e.g. Qwen2.5's
# '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n'
DEFAULT_SYSTEM_IN_TEMPLATE = re.compile(r"<\|im_start\|>system\\n([^'\"{}]+?)<\|im_end\|>")




def chat_segments(
    messages: Sequence[Mapping[str, str]], default_system: str | None, add_generation_prompt: bool
) -> list[tuple[str, bool]]:
    """ChatML as (text, is_special_token) segments, adjacent texts joined (HF encodes them together)."""
    check_messages(messages)
    if messages[0]["role"] != "system" and default_system is not None:
        messages = [{"role": "system", "content": default_system}, *messages]
    pieces: list[tuple[str, bool]] = []
    for message in messages:
        pieces += [("<|im_start|>", True), (f"{message['role']}\n{message['content']}", False), ("<|im_end|>", True), ("\n", False)]
    if add_generation_prompt:
        pieces += [("<|im_start|>", True), ("assistant\n", False)]
    segments: list[tuple[str, bool]] = []
    for text, is_special in pieces:
        if segments and not is_special and not segments[-1][1]:
            segments[-1] = (segments[-1][0] + text, False)
        else:
            segments.append((text, is_special))
    return segments


def check_messages(messages: Sequence[Mapping[str, str]]) -> None:
    """``ValueError`` naming the first message that is not {"role": known role, "content": str}."""
    if isinstance(messages, (str, Mapping)) or not isinstance(messages, Sequence):
        raise ValueError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: a chat prompt needs at least one message")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {i} is a {type(message).__name__}, not a dict with 'role' and 'content'")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise ValueError(f"message {i} has keys {extra} that minqwen's ChatML does not support (only 'role' and 'content')")
        if message.get("role") not in CHAT_ROLES:
            raise ValueError(f"message {i} has role {message.get('role')!r}; expected one of {list(CHAT_ROLES)}")
        if not isinstance(message.get("content"), str):
            raise ValueError(f"message {i} content must be a str, got {type(message.get('content')).__name__}")


def default_system_prompt(chat_template: str | None) -> str | None:
    """The system prompt a ChatML ``chat_template`` inserts when the messages have none (or None).

    ``ValueError`` for a template that is not ChatML: minqwen reproduces ChatML templates only.
    """
    if chat_template is None:
        return None
    if "<|im_start|>" not in chat_template:
        raise ValueError("this checkpoint's chat template is not ChatML; minqwen reproduces ChatML templates only")
    found = DEFAULT_SYSTEM_IN_TEMPLATE.search(chat_template)
    return found.group(1).replace("\\n", "\n") if found else None
