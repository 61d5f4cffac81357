"""Turning next-token logits into text: KV-cache decoding, batches and streaming.

A causal LM only ever predicts one token. Generation is the loop around it:

1. **Prefill** -- run the whole prompt once; the KV cache keeps every layer's keys and values.
2. **Decode** -- feed only the newest token; attention reads the earlier ones from the cache.
   Each step costs one token's worth of compute instead of a full re-run of the sequence.
3. **Choose** the next token from the last position's logits, as a
   :class:`~minqwen.sampling.GenerationConfig` says: greedy by default, or a sample
   (:mod:`minqwen.sampling` holds the settings, the filters and the sampler).
4. **Stop** at a stop id (by default the checkpoint's EOS ids, e.g. ``<|im_end|>`` and
   ``<|endoftext|>``), after ``max_new_tokens``, or when the context is full.

Prompts of different lengths run as one batch by padding on the left: every row's last prompt
token then sits in the same column, an attention mask hides the padding, and position ids start
at 0 on each row's first real token -- so each row computes what it would compute alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Protocol, Sequence

import torch

from .cache import KVCache
from .model import Qwen2ForCausalLM
from .sampling import GenerationConfig, Sampler, generation_config
from .sampling import apply_repetition_penalty, top_k_filter, top_p_filter  # noqa: F401  (their home before minqwen.sampling)

DEFAULT_MAX_NEW_TOKENS = 64  # when neither the call nor its GenerationConfig says


# --------------------------------------------------------------------------- checking inputs
def as_prompts(input_ids: Any) -> tuple[list[list[int]], bool]:
    """Normalise one prompt or a batch to a list of id lists; also say whether it was a batch.

    One prompt: a list of ints or a 1-D tensor. A batch: a list of such lists or a 2-D tensor.
    """
    if isinstance(input_ids, str):
        raise TypeError("generate() takes token ids; encode the text with a Tokenizer first (or use minqwen.stream)")
    if isinstance(input_ids, torch.Tensor):
        if input_ids.dim() not in (1, 2) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be integer ids of shape (seq,) or (batch, seq), got {input_ids.dtype} {tuple(input_ids.shape)}")
        return (input_ids.tolist(), True) if input_ids.dim() == 2 else ([input_ids.tolist()], False)
    rows = list(input_ids)
    if rows and all(isinstance(row, (list, tuple, torch.Tensor)) for row in rows):
        return [as_prompts(row)[0][0] if isinstance(row, torch.Tensor) else list(row) for row in rows], True
    return [rows], False


def check_prompts(prompts: list[list[int]], vocab_size: int) -> None:
    """Every prompt non-empty and made of ids inside the vocabulary, else ``ValueError``."""
    if not prompts:
        raise ValueError("the batch is empty: pass at least one prompt")
    for row, prompt in enumerate(prompts):
        where = f"prompt {row}" if len(prompts) > 1 else "the prompt"
        if not prompt:
            raise ValueError(f"{where} is empty: generation needs at least one token to continue from")
        bad = [t for t in prompt if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"{where} has token id {bad[0]!r}, outside the vocabulary [0, {vocab_size})")


def context_length(model: Qwen2ForCausalLM) -> int:
    """How many tokens (prompt + generated) the model attends over."""
    return model.config.max_position_embeddings


def default_stop_ids(model: Qwen2ForCausalLM) -> set[int]:
    """The checkpoint's end-of-sequence ids (``config.eos_token_id``: an int, a list or None)."""
    eos = model.config.eos_token_id
    if eos is None:
        return set()
    return {eos} if isinstance(eos, int) else set(eos)


# --------------------------------------------------------------------------- the decoding loop
@dataclass
class GenerationStep:
    """One decoding step of a batch.

    logits: (batch, vocab) float32, the model's raw next-token logits at this step.
    token_ids: the token chosen for each row, or None once the row has stopped (a stop id
    ends a row and is not reported).
    """

    logits: torch.Tensor
    token_ids: list[int | None]


def padded_batch(prompts: list[list[int]], new_tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad the prompts and leave room for ``new_tokens`` generated columns.

    Returns ids (batch, width + new_tokens), attention mask (same shape, 1 = real token, every
    generated column counts as real) and position ids (0 at each row's first real token).
    """
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width + new_tokens, dtype=torch.long)
    mask = torch.ones_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) : width] = torch.tensor(prompt)
        mask[row, : width - len(prompt)] = 0
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    return ids, mask, positions


def last_logits(
    model: Qwen2ForCausalLM,
    ids: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor | None,
    end: int,
    cache: KVCache | None,
) -> torch.Tensor:
    """Logits (batch, vocab) for the token after column ``end - 1``.

    With a cache only the columns it does not hold yet are run; without one the whole sequence
    is recomputed. The head (vocab x hidden, the largest matrix in a small model) is applied to
    the last position only: the other positions' logits would be thrown away.
    """
    start = cache.length if cache is not None else 0
    attention_mask = mask[:, :end] if mask is not None else None
    hidden = model.model(ids[:, start:end], positions[:, start:end], attention_mask, cache)  # (B, T, hidden)
    return model.lm_head(hidden[:, -1]).float()  # (B, vocab)


def generate_steps(
    model: Qwen2ForCausalLM,
    prompts: list[list[int]],
    max_new_tokens: int | None = None,
    *,
    generation_config: GenerationConfig | None = None,
    use_cache: bool = True,
    cache: KVCache | None = None,
    **settings: Any,
) -> Iterator[GenerationStep]:
    """The loop under :func:`generate`, :func:`stream` and :class:`~minqwen.Chat`: one step per token.

    prompts: lists of token ids (left-padded into one batch). The settings are
    ``generation_config`` with ``max_new_tokens`` and any :class:`GenerationConfig` field given as
    a keyword (``stop_token_ids=[]``, ``temperature=0.7``, ...) on top. ``use_cache=False``
    recomputes the whole sequence at every step (slow; the reference the cache is tested
    against). ``cache``: a single prompt's cache to continue from; it must hold the keys and
    values of the prompt's first ``cache.length`` tokens (Chat reuses the conversation so far
    this way) and have room for the rest of the prompt plus ``max_new_tokens``. Stops when every
    row hit a stop id, after ``max_new_tokens`` steps, or when the context is full. Inputs are
    checked here, when the iterator is made, not at its first step.
    """
    config = generation_config_for(generation_config, max_new_tokens=max_new_tokens, **settings)
    check_prompts(prompts, model.config.vocab_size)
    steps = fit_to_context(model, prompts, config.max_new_tokens)
    stops = default_stop_ids(model) if config.stop_token_ids is None else set(config.stop_token_ids)
    ids, mask, positions = (t.to(model.model.embed_tokens.weight.device) for t in padded_batch(prompts, steps))
    cache = prepare_cache(model, prompts, ids.shape[1], use_cache, cache)
    return decode_loop(model, ids, mask, positions, steps, Sampler(config), stops, cache)


def generation_config_for(
    config: GenerationConfig | None, default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, **settings: Any
) -> GenerationConfig:
    """The settings of one call: ``config`` with the keyword ``settings`` on top, and
    ``max_new_tokens`` filled in with the entry point's default when neither gave it."""
    config = generation_config(config, **settings)
    return config if config.max_new_tokens is not None else config.updated(max_new_tokens=default_max_new_tokens)


@torch.no_grad()
def decode_loop(
    model: Qwen2ForCausalLM,
    ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    max_new_tokens: int,
    sampler: Sampler,
    stops: set[int],
    cache: KVCache | None,
) -> Iterator[GenerationStep]:
    """Fill the generated columns of ``ids`` (from :func:`padded_batch`) one step at a time."""
    batch, end = ids.shape[0], ids.shape[1] - max_new_tokens  # end: columns filled so far
    has_padding = not bool(mask[:, :end].all())
    seen = seen_tokens(ids[:, :end], mask[:, :end], model.config.vocab_size) if sampler.config.repetition_penalty else None
    running = [True] * batch  # on the host: the ids are read there anyway, once per step
    for _ in range(max_new_tokens):
        logits = last_logits(model, ids, positions, mask if has_padding else None, end, cache)
        next_ids = sampler(logits, seen)  # (B,)
        tokens = next_ids.tolist()
        running = [alive and token not in stops for alive, token in zip(running, tokens)]
        yield GenerationStep(logits, [token if alive else None for token, alive in zip(tokens, running)])
        if not any(running):
            return
        ids[:, end] = next_ids
        end += 1
        if seen is not None:
            seen[torch.arange(batch, device=ids.device), next_ids] = True


def fit_to_context(model: Qwen2ForCausalLM, prompts: list[list[int]], max_new_tokens: int) -> int:
    """``max_new_tokens`` cut to what fits after the longest prompt; ``ValueError`` if nothing fits."""
    longest, limit = max(len(p) for p in prompts), context_length(model)
    if longest >= limit:
        raise ValueError(
            f"the prompt has {longest} tokens but the model's context holds {limit} "
            f"(max_position_embeddings), leaving no room to generate"
        )
    return min(max_new_tokens, limit - longest)


def prepare_cache(
    model: Qwen2ForCausalLM, prompts: list[list[int]], total_len: int, use_cache: bool, cache: KVCache | None
) -> KVCache | None:
    """A fresh cache for ``total_len`` columns, the caller's cache after checking it, or None."""
    if cache is None:
        return model.make_cache(len(prompts), total_len) if use_cache else None
    if not use_cache or len(prompts) != 1:
        raise ValueError("a cache to continue from works with use_cache=True and a single prompt")
    if not 0 <= cache.length < len(prompts[0]):
        raise ValueError(
            f"the cache holds {cache.length} tokens but must hold fewer than the prompt's {len(prompts[0])} "
            f"(at least one prompt token has to run to predict the next)"
        )
    if cache.max_seq_len < total_len - 1:
        raise ValueError(f"the cache has room for {cache.max_seq_len} tokens, generation needs {total_len - 1}")
    return cache


def seen_tokens(ids: torch.Tensor, mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(batch, vocab) bool: which ids occur among each row's real (unpadded) tokens."""
    counts = torch.zeros(ids.shape[0], vocab_size, dtype=torch.long, device=ids.device)
    return counts.scatter_add_(1, ids, mask.long()) > 0


# --------------------------------------------------------------------------- public entry points
def generate(
    model: Qwen2ForCausalLM,
    input_ids: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
    max_new_tokens: int | None = None,
    *,
    generation_config: GenerationConfig | None = None,
    use_cache: bool = True,
    **settings: Any,
) -> list[int] | list[list[int]]:
    """Continue token ids; return only the new ids (a stop id ends a row and is left out).

    input_ids: one prompt (list of ints or 1-D tensor) -> a list of new ids; a batch (list of
    lists of any lengths, or a 2-D tensor) -> one list per prompt. The settings are a
    :class:`GenerationConfig`; keywords are a shorthand for its fields and win over it:
    ``generate(model, ids, 32, temperature=0.7, top_p=0.8, seed=0)``. Greedy by default, at most
    64 new tokens, stopping at the checkpoint's EOS ids (``stop_token_ids=[]`` never stops early)
    or when the context is full. Bad settings raise ``ValueError`` before any compute.
    """
    prompts, batched = as_prompts(input_ids)
    outputs: list[list[int]] = [[] for _ in prompts]
    steps = generate_steps(
        model, prompts, max_new_tokens, generation_config=generation_config, use_cache=use_cache, **settings
    )
    for step in steps:
        for row, token in enumerate(step.token_ids):
            if token is not None:
                outputs[row].append(token)
    return outputs if batched else outputs[0]


class IncrementalDecoder(Protocol):
    """What :func:`stream` needs from ``tokenizer.stream_decoder()`` (a ``minqwen.tokenizer.StreamDecoder``)."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class TextTokenizer(Protocol):
    """What :func:`stream` needs from a tokenizer (``minqwen.Tokenizer`` has it)."""

    def encode(self, text: str) -> list[int]: ...

    def stream_decoder(self) -> IncrementalDecoder: ...


class TextStream:
    """Iterate to get text pieces as tokens are decoded; counts tokens and time as it goes.

    Incomplete UTF-8 (a character split over tokens) is held back until it is whole. During and
    after the iteration ``token_ids`` holds the new ids and :meth:`stats` the speed. Leaving
    the loop early (``break``, an exception, Ctrl-C) stops the generation.
    """

    def __init__(self, steps: Iterator[GenerationStep], tokenizer: TextTokenizer) -> None:
        self._steps = steps
        self._decoder = tokenizer.stream_decoder()
        self._pieces: list[str] = []
        self._done = False
        self.token_ids: list[int] = []
        self.prefill_seconds = 0.0  # prompt processing + first token
        self.decode_seconds = 0.0  # every later token

    def __iter__(self) -> Iterator[str]:
        if self._done:
            return
        start = time.perf_counter()
        try:
            for token in self._tokens():
                now = time.perf_counter()
                if len(self.token_ids) == 1:
                    self.prefill_seconds = now - start
                else:
                    self.decode_seconds = now - start - self.prefill_seconds
                yield from self._emit(self._decoder.push(token))
            yield from self._emit(self._decoder.flush())
        finally:
            self._done = True
            close = getattr(self._steps, "close", None)
            if close is not None:
                close()

    def _tokens(self) -> Iterator[int]:
        """The new token ids of the (single) row, until it stops."""
        for step in self._steps:
            token = step.token_ids[0]
            if token is None:
                return
            self.token_ids.append(token)
            yield token

    def _emit(self, piece: str) -> Iterator[str]:
        """Yield a non-empty piece and remember it for :meth:`text`."""
        if piece:
            self._pieces.append(piece)
            yield piece

    def text(self) -> str:
        """Run to the end (if not done yet) and return all the text."""
        for _ in self:
            pass
        return "".join(self._pieces)

    @property
    def tokens_per_second(self) -> float:
        """Decoding speed after the first token (0 until two tokens exist)."""
        return (len(self.token_ids) - 1) / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def stats(self) -> str:
        """One line for humans, e.g. ``32 tokens, first after 0.21 s, then 25.3 tokens/s``."""
        count = len(self.token_ids)
        if count < 2:
            return f"{count} token{'' if count == 1 else 's'} in {self.prefill_seconds:.2f} s"
        return f"{count} tokens, first after {self.prefill_seconds:.2f} s, then {self.tokens_per_second:.1f} tokens/s"


def stream(
    model: Qwen2ForCausalLM,
    tokenizer: TextTokenizer,
    prompt: str | Sequence[int],
    max_new_tokens: int | None = None,
    *,
    generation_config: GenerationConfig | None = None,
    **settings: Any,
) -> TextStream:
    """Generate from one prompt and yield text as it is decoded (settings as in :func:`generate`).

    ``prompt`` is text (encoded with ``tokenizer``, no special tokens) or token ids.
    ``for piece in minqwen.stream(model, tok, "def fib(n):"): print(piece, end="", flush=True)``
    """
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("the prompt is empty: generation needs some text to continue")
        prompt = tokenizer.encode(prompt)
    prompts, batched = as_prompts(prompt)
    if batched:
        raise ValueError("stream() takes one prompt; use generate() for a batch")
    steps = generate_steps(model, prompts, max_new_tokens, generation_config=generation_config, **settings)
    return TextStream(steps, tokenizer)

