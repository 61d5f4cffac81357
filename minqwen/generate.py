"""Turning next-token logits into text: KV-cache decoding, sampling, batches and streaming.

A causal LM only ever predicts one token. Generation is the loop around it:

1. **Prefill** -- run the whole prompt once; the KV cache keeps every layer's keys and values.
2. **Decode** -- feed only the newest token; attention reads the earlier ones from the cache.
   Each step costs one token's worth of compute instead of a full re-run of the sequence.
3. **Choose** the next token from the last position's logits: the most likely one (greedy, at
   ``temperature == 0``), or a sample after the usual controls -- repetition penalty,
   temperature, top-k and top-p (nucleus, Holtzman et al. 2019), applied in HF's order.
4. **Stop** at a stop id (by default the checkpoint's EOS ids, e.g. ``<|im_end|>`` and
   ``<|endoftext|>``), after ``max_new_tokens``, or when the context is full.

Prompts of different lengths run as one batch by padding on the left: every row's last prompt
token then sits in the same column, an attention mask hides the padding, and position ids start
at 0 on each row's first real token -- so each row computes what it would compute alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol, Sequence

import torch

from .cache import KVCache
from .model import Qwen2ForCausalLM

DEFAULT_MAX_NEW_TOKENS = 64


# --------------------------------------------------------------------------- sampling controls
def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits of each row, set the rest to -inf. logits (..., vocab).

    Ties with the k-th value are kept (as in HF's ``TopKLogitsWarper``).
    """
    if k >= logits.shape[-1]:
        return logits
    kth_largest = logits.topk(k, dim=-1).values[..., -1:]  # (..., 1)
    return logits.masked_fill(logits < kth_largest, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Nucleus filter: keep the most likely tokens until their probability reaches ``p``.

    A token survives if the tokens ranked above it hold less than ``p`` of the probability, so
    the top token always survives. logits (..., vocab) -> same shape, dropped tokens at -inf.
    """
    if p >= 1.0:
        return logits  # everything survives; skipping avoids cumulative-sum rounding at 1.0
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    sorted_probs = sorted_logits.float().softmax(dim=-1)
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs  # probability of better-ranked tokens
    drop_sorted = mass_above >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make tokens already in the sequence less likely (CTRL, Keskar et al. 2019; HF's rule).

    A seen token's positive logit is divided by ``penalty``, a negative one multiplied by it.
    logits (batch, vocab); seen (batch, vocab) bool, True where the token occurred.
    """
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


@dataclass
class Sampler:
    """How the next token is picked from logits; validates the settings when created.

    ``temperature == 0`` is greedy (argmax; top-k/top-p then change nothing). Otherwise the
    logits go through repetition penalty, temperature, top-k and top-p, and one token is drawn.
    ``seed`` makes the draws reproducible without touching PyTorch's global random state.
    """

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    _generator: torch.Generator | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.temperature, (int, float)) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {self.temperature!r}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 1):
            raise ValueError(f"top_k must be an integer >= 1 (or None for no limit), got {self.top_k!r}")
        if self.top_p is not None and not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (or None for no limit), got {self.top_p!r}")
        if self.repetition_penalty is not None and not (
            isinstance(self.repetition_penalty, (int, float)) and self.repetition_penalty > 0
        ):
            raise ValueError(f"repetition_penalty must be a number > 0 (1 = none), got {self.repetition_penalty!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")

    @property
    def is_greedy(self) -> bool:
        """True when the choice is a plain argmax."""
        return self.temperature == 0

    def filtered_logits(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """logits (batch, vocab) after penalty, temperature, top-k and top-p, in float32."""
        logits = logits.float()
        if self.repetition_penalty is not None and seen is not None:
            logits = apply_repetition_penalty(logits, seen, self.repetition_penalty)
        if self.is_greedy:
            return logits
        logits = logits / self.temperature
        if self.top_k is not None:
            logits = top_k_filter(logits, self.top_k)
        if self.top_p is not None:
            logits = top_p_filter(logits, self.top_p)
        return logits

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """The next token of each row: logits (batch, vocab) -> ids (batch,)."""
        logits = self.filtered_logits(logits, seen)
        if self.is_greedy:
            return logits.argmax(dim=-1)
        probs = logits.softmax(dim=-1)  # (batch, vocab)
        return torch.multinomial(probs, num_samples=1, generator=self._random(probs.device)).squeeze(-1)

    def _random(self, device: torch.device) -> torch.Generator | None:
        """The seeded generator (made on first use, on the logits' device), or None: global RNG."""
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return self._generator


# --------------------------------------------------------------------------- checking inputs
def check_max_new_tokens(max_new_tokens: int) -> int:
    """``max_new_tokens`` as an int >= 0, or a ``ValueError`` saying what is wrong."""
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    return max_new_tokens


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
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    sampler: Sampler | None = None,
    stop_token_ids: Sequence[int] | None = None,
    use_cache: bool = True,
    cache: KVCache | None = None,
) -> Iterator[GenerationStep]:
    """The loop under :func:`generate`, :func:`stream` and :class:`~minqwen.Chat`: one step per token.

    prompts: lists of token ids (left-padded into one batch). ``use_cache=False`` recomputes the
    whole sequence at every step (slow; the reference the cache is tested against). ``cache``: a
    single prompt's cache to continue from; it must hold the keys and values of the prompt's
    first ``cache.length`` tokens (Chat reuses the conversation so far this way) and have room
    for the rest of the prompt plus ``max_new_tokens``. Stops when every row hit a stop id,
    after ``max_new_tokens`` steps, or when the context is full. Inputs are checked here, when
    the iterator is made, not at its first step.
    """
    check_prompts(prompts, model.config.vocab_size)
    max_new_tokens = fit_to_context(model, prompts, check_max_new_tokens(max_new_tokens))
    stops = default_stop_ids(model) if stop_token_ids is None else set(stop_token_ids)
    ids, mask, positions = (t.to(model.lm_head.weight.device) for t in padded_batch(prompts, max_new_tokens))
    cache = prepare_cache(model, prompts, ids.shape[1], use_cache, cache)
    return decode_loop(model, ids, mask, positions, max_new_tokens, sampler or Sampler(), stops, cache)


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
    seen = seen_tokens(ids[:, :end], mask[:, :end], model.config.vocab_size) if sampler.repetition_penalty else None
    stop_ids = torch.tensor(sorted(stops), dtype=torch.long, device=ids.device)
    running = torch.ones(batch, dtype=torch.bool, device=ids.device)
    for _ in range(max_new_tokens):
        logits = last_logits(model, ids, positions, mask if has_padding else None, end, cache)
        next_ids = sampler(logits, seen)  # (B,)
        running &= ~torch.isin(next_ids, stop_ids)
        yield GenerationStep(logits, [int(t) if alive else None for t, alive in zip(next_ids.tolist(), running.tolist())])
        if not running.any():
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
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    stop_token_ids: Sequence[int] | None = None,
    seed: int | None = None,
    use_cache: bool = True,
) -> list[int] | list[list[int]]:
    """Continue token ids; return only the new ids (a stop id ends a row and is left out).

    input_ids: one prompt (list of ints or 1-D tensor) -> a list of new ids; a batch (list of
    lists of any lengths, or a 2-D tensor) -> one list per prompt. ``temperature=0`` is greedy;
    otherwise ``top_k``, ``top_p`` and ``repetition_penalty`` shape the distribution and
    ``seed`` makes the draws reproducible. ``stop_token_ids`` defaults to the checkpoint's EOS
    ids (``[]`` never stops early). Generation also ends when the context is full.
    Bad settings raise ``ValueError`` before any compute.
    """
    prompts, batched = as_prompts(input_ids)
    sampler = Sampler(temperature, top_k, top_p, repetition_penalty, seed)
    outputs: list[list[int]] = [[] for _ in prompts]
    for step in generate_steps(model, prompts, max_new_tokens, sampler, stop_token_ids, use_cache):
        for row, token in enumerate(step.token_ids):
            if token is not None:
                outputs[row].append(token)
    return outputs if batched else outputs[0]


class StreamDecoder(Protocol):
    """What :func:`stream` needs from ``tokenizer.stream_decoder()``."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class TextTokenizer(Protocol):
    """What :func:`stream` needs from a tokenizer (``minqwen.Tokenizer`` has it)."""

    def encode(self, text: str) -> list[int]: ...

    def stream_decoder(self) -> StreamDecoder: ...


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
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    stop_token_ids: Sequence[int] | None = None,
    seed: int | None = None,
) -> TextStream:
    """Generate from one prompt and yield text as it is decoded (see :func:`generate`).

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
    sampler = Sampler(temperature, top_k, top_p, repetition_penalty, seed)
    return TextStream(generate_steps(model, prompts, max_new_tokens, sampler, stop_token_ids), tokenizer)
