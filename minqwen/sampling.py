"""Choosing the next token: the generation settings as one object, the logit filters, the sampler.

:class:`GenerationConfig` holds every setting of a generation, with HF's names, and checks them
when it is made. :func:`minqwen.generate`, :func:`minqwen.stream`, :class:`minqwen.Chat` and the
CLI all take one (``generation_config=``); their keyword arguments (``temperature=0.7``, ...) are
a shorthand that replaces the fields of the same name.

From logits to a token, in HF's order: repetition penalty, temperature, top-k, top-p (nucleus,
Holtzman et al. 2019), then one draw from the softmax -- or, at ``temperature == 0``, the argmax.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class GenerationConfig:
    """How to generate: how many tokens, how to choose each one, when to stop.

    The names are HF's (``transformers.GenerationConfig``), with one difference: greedy decoding
    is ``temperature=0`` (the default), where HF says ``do_sample=False``. Any ``temperature > 0``
    samples, so ``GenerationConfig(temperature=0.7, top_p=0.8)`` means what it says. At
    ``temperature=0`` top-k and top-p change nothing, but ``repetition_penalty`` still applies.
    Bad values raise ``ValueError`` here, before any compute.
    """

    max_new_tokens: int | None = None  # stop after this many new tokens; None: the caller's default (generate 64, Chat 512)
    temperature: float = 0.0  # 0: greedy; higher: flatter distribution, more varied text
    top_k: int | None = None  # sample among the k most likely tokens only (None: no limit)
    top_p: float | None = None  # sample among the most likely tokens holding probability p only (None: no limit)
    repetition_penalty: float | None = None  # > 1 makes tokens already in the sequence less likely (None: off)
    seed: int | None = None  # makes sampling reproducible, on the model's device; None: torch's global RNG
    stop_token_ids: tuple[int, ...] | None = None  # None: the checkpoint's EOS ids; (): never stop early

    def __post_init__(self) -> None:
        if self.max_new_tokens is not None and not (_is_int(self.max_new_tokens) and self.max_new_tokens >= 0):
            raise ValueError(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not (_is_number(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a number >= 0 (0 means greedy), got {self.temperature!r}")
        if self.top_k is not None and not (_is_int(self.top_k) and self.top_k >= 1):
            raise ValueError(f"top_k must be an integer >= 1 (or None for no limit), got {self.top_k!r}")
        if self.top_p is not None and not (_is_number(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1] (or None for no limit), got {self.top_p!r}")
        if self.repetition_penalty is not None and not (_is_number(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be a number > 0 (1 = none), got {self.repetition_penalty!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.stop_token_ids is not None:
            stops = tuple(self.stop_token_ids)
            if not all(_is_int(t) for t in stops):
                raise ValueError(f"stop_token_ids must be token ids (integers), got {self.stop_token_ids!r}")
            object.__setattr__(self, "stop_token_ids", stops)  # a list works too; store it immutable

    @property
    def is_greedy(self) -> bool:
        """True when the choice is a plain argmax."""
        return self.temperature == 0

    def updated(self, **settings: Any) -> GenerationConfig:
        """A copy with ``settings`` replacing the fields of the same name (an unknown name is a
        ``TypeError``). ``max_new_tokens=None`` keeps this config's value: None there means "not given"."""
        unknown = sorted(set(settings) - FIELD_NAMES)
        if unknown:
            raise TypeError(f"unknown generation setting {unknown[0]!r}; the settings are {', '.join(sorted(FIELD_NAMES))}")
        if settings.get("max_new_tokens", 0) is None:
            del settings["max_new_tokens"]
        return dataclasses.replace(self, **settings) if settings else self


FIELD_NAMES = frozenset(f.name for f in dataclasses.fields(GenerationConfig))


def generation_config(config: GenerationConfig | None = None, **settings: Any) -> GenerationConfig:
    """``config`` (default: greedy, the checkpoint's stop ids) with keyword ``settings`` on top.

    The one place where ``generation_config=`` and the keyword shorthand meet.
    """
    if config is not None and not isinstance(config, GenerationConfig):
        raise TypeError(f"generation_config must be a minqwen.GenerationConfig, got {type(config).__name__}")
    return (config or GenerationConfig()).updated(**settings)


# --------------------------------------------------------------------------- the filters
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


# --------------------------------------------------------------------------- the sampler
class Sampler:
    """Picks the next token from logits as a :class:`GenerationConfig` says.

    ``Sampler(config)`` or ``Sampler(temperature=0.7, top_k=20, seed=0)``. With a ``seed`` the
    draws come from the sampler's own ``torch.Generator``, made on the logits' device at the
    first draw, so they are reproducible there and PyTorch's global random state is untouched.
    One sampler serves one generation: its draws continue from step to step.
    """

    def __init__(self, config: GenerationConfig | None = None, **settings: Any) -> None:
        self.config = generation_config(config, **settings)
        self._generator: torch.Generator | None = None

    def __repr__(self) -> str:
        return f"Sampler({self.config!r})"

    def filtered_logits(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """logits (batch, vocab) after penalty, temperature, top-k and top-p, in float32."""
        config = self.config
        logits = logits.float()
        if config.repetition_penalty is not None and seen is not None:
            logits = apply_repetition_penalty(logits, seen, config.repetition_penalty)
        if config.is_greedy:
            return logits
        logits = logits / config.temperature
        if config.top_k is not None:
            logits = top_k_filter(logits, config.top_k)
        if config.top_p is not None:
            logits = top_p_filter(logits, config.top_p)
        return logits

    def __call__(self, logits: torch.Tensor, seen: torch.Tensor | None = None) -> torch.Tensor:
        """The next token of each row: logits (batch, vocab) -> ids (batch,)."""
        logits = self.filtered_logits(logits, seen)
        if self.config.is_greedy:
            return logits.argmax(dim=-1)
        probs = logits.softmax(dim=-1)  # (batch, vocab)
        return torch.multinomial(probs, num_samples=1, generator=self._random(probs.device)).squeeze(-1)

    def _random(self, device: torch.device) -> torch.Generator | None:
        """The seeded generator on ``device`` (made on first use), or None: the global RNG."""
        if self.config.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.config.seed)
        return self._generator

