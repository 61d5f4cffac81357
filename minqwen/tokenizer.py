"""Qwen2's tokenizer: the ``Tokenizer`` that reads HF tokenizer files, encodes and decodes.

A Qwen2 checkpoint ships its tokenizer as HF files (``tokenizer.json``, or ``vocab.json`` +
``merges.txt``, plus ``tokenizer_config.json``); a GGUF file's ``tokenizer.ggml.*`` metadata is
turned into those files by :mod:`minqwen.loading.gguf`, so everything downstream (minqwen, HF
``tokenizers``, ``transformers.AutoTokenizer``) reads one format.

:class:`Tokenizer` loads those files and wraps the byte-level BPE of :mod:`minqwen.bpe` (from
scratch, or tiktoken's Rust core on the same ranks) with what a model needs around it: NFC
normalisation, special tokens that user text can never inject, decoding that never raises,
a streaming decoder, and the ChatML chat template (:mod:`minqwen.chatml`).
"""

from __future__ import annotations

import codecs
import functools
import json
import os
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Iterable, Literal, Mapping, Sequence

import regex

from .bpe import (
    QWEN2_PATTERN,
    Pair,
    PythonBPE,
    TiktokenBPE,
    bytes_to_unicode,
    check_vocabulary,
    learn_merges,
    tiktoken_compatible,
    token_to_bytes,
)
from .chatml import chat_segments, default_system_prompt

Backend = Literal["auto", "tiktoken", "python"]
AllowedSpecial = Literal["all"] | Collection[str]


@dataclass(frozen=True)
class AddedToken:
    """A token matched as a whole before BPE (``<|im_end|>``), never built from merges.

    ``special`` is HF's flag: ``decode(..., skip_special_tokens=True)`` drops special tokens.
    """

    id: int
    content: str
    special: bool = True


class Tokenizer:
    """Qwen2's byte-level BPE tokenizer with its special tokens and ChatML template.

    >>> tok = Tokenizer.from_pretrained("qwen2.5-coder-0.5b-instruct")  # doctest: +SKIP
    >>> tok.encode("Hello world")  # doctest: +SKIP
    [9707, 1879]

    ``vocab`` maps byte-level token strings ("Ġthe") to ids, ``merges`` lists the BPE merges by
    rank, ``added_tokens`` are matched whole (``<|im_end|>``). ``pattern`` is the pre-tokeniser
    regex and ``nfc`` whether text is NFC-normalised first (both as in Qwen2's tokenizer.json);
    the special-token names and ``chat_template`` come from tokenizer_config.json. Usually built
    by :meth:`from_pretrained`.

    ``backend="python"`` runs the from-scratch BPE of :mod:`minqwen.bpe`; ``"tiktoken"`` runs the
    same ranks in tiktoken's Rust core; ``"auto"`` (the default) picks tiktoken when it gives
    the same ids (:func:`minqwen.bpe.tiktoken_compatible`, the cheap check), Python otherwise.
    """

    def __init__(
        self,
        vocab: Mapping[str, int],
        merges: Sequence[Pair],
        added_tokens: Iterable[AddedToken] = (),
        *,
        pattern: str = QWEN2_PATTERN,
        nfc: bool = True,
        eos_token: str | None = None,
        bos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        backend: Backend = "auto",
    ) -> None:
        added_tokens = list(added_tokens)
        self.vocab = _vocab_without_added_tokens(dict(vocab), added_tokens)
        self.merges = [tuple(pair) for pair in merges]
        check_vocabulary(self.vocab, self.merges)
        self.added_tokens = {token.content: token for token in added_tokens}
        self.pattern = pattern
        self.nfc = nfc  # normalise text to NFC before splitting, as Qwen2's tokenizer.json does
        self.chat_template = chat_template
        self.backend = _choose_backend(backend, self.vocab, self.merges)
        encoder = TiktokenBPE if self.backend == "tiktoken" else PythonBPE
        self._bpe = encoder(self.vocab, self.merges, pattern)
        self._id_to_token, self._id_to_bytes = self._build_id_tables()
        self._special_ids = frozenset(t.id for t in self.added_tokens.values() if t.special)
        self.eos_token, self.bos_token, self.pad_token = eos_token, bos_token, pad_token
        self.eos_token_id, self.bos_token_id, self.pad_token_id = (self._id_of_named(name) for name in (eos_token, bos_token, pad_token))

    def _build_id_tables(self) -> tuple[list[str | None], list[bytes | None]]:
        """id -> token string and id -> bytes (``None`` for ids no token uses)."""
        size = 1 + max([*self.vocab.values(), *(t.id for t in self.added_tokens.values())])
        tokens: list[str | None] = [None] * size
        for token, token_id in self.vocab.items():
            if not isinstance(token_id, int) or token_id < 0 or tokens[token_id] is not None:
                raise ValueError(f"token {token!r} has id {token_id!r}: ids must be distinct non-negative integers")
            tokens[token_id] = token
        data = [None if token is None else token_to_bytes(token) for token in tokens]
        for added in self.added_tokens.values():
            if tokens[added.id] is not None:
                raise ValueError(f"added token {added.content!r} has id {added.id}, already used by {tokens[added.id]!r}")
            tokens[added.id], data[added.id] = added.content, added.content.encode("utf-8")
        return tokens, data

    def _id_of_named(self, name: str | None) -> int | None:
        if name is None:
            return None
        token_id = self.token_to_id(name)
        if token_id is None:
            raise ValueError(f"the special token {name!r} named in the tokenizer config is not in the vocabulary")
        return token_id

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, backend: Backend = "auto") -> Tokenizer:
        """Load from a directory with ``tokenizer.json`` (or ``vocab.json`` + ``merges.txt``),
        else from the tokenizer files :func:`minqwen.loading.hub.resolve_tokenizer` makes of
        ``name_or_path`` (a checkpoint name, a ``.gguf`` file, a hub repo id)."""
        directory = tokenizer_directory(name_or_path)
        config = _read_json(directory / "tokenizer_config.json") if (directory / "tokenizer_config.json").is_file() else {}
        if "chat_template" not in config and (directory / "chat_template.jinja").is_file():  # where transformers 5 saves it
            config["chat_template"] = (directory / "chat_template.jinja").read_text(encoding="utf-8")
        if (directory / "tokenizer.json").is_file():
            return cls.from_tokenizer_json(directory / "tokenizer.json", config, backend)
        if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
            return cls.from_vocab_and_merges(directory / "vocab.json", directory / "merges.txt", config, backend)
        raise FileNotFoundError(f"{directory}: no tokenizer files (expected tokenizer.json, or vocab.json and merges.txt)")

    @classmethod
    def from_tokenizer_json(
        cls, source: Mapping[str, Any] | str | os.PathLike, config: Mapping[str, Any] | None = None, backend: Backend = "auto"
    ) -> Tokenizer:
        """Build from an HF ``tokenizer.json`` (a path or the parsed dict) and an optional
        ``tokenizer_config.json`` dict (special-token names, chat template)."""
        name = "tokenizer.json" if isinstance(source, Mapping) else str(source)
        data = source if isinstance(source, Mapping) else _read_json(Path(source))
        try:
            model, pattern, nfc = data["model"], _split_pattern(data.get("pre_tokenizer")), _uses_nfc(data.get("normalizer"))
            if model.get("type") != "BPE" or model.get("byte_fallback") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
                raise ValueError(f"model {model.get('type')!r} is not a plain byte-level BPE")
            merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
            added = [AddedToken(t["id"], t["content"], bool(t.get("special", True))) for t in data.get("added_tokens", [])]
            return cls(model["vocab"], merges, added, pattern=pattern, nfc=nfc, backend=backend, **_names_from_config(config or {}))
        except (KeyError, TypeError, ValueError) as e:
            message = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise ValueError(f"{name}: {message}") from None

    @classmethod
    def from_vocab_and_merges(
        cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike, config: Mapping[str, Any] | None = None, backend: Backend = "auto"
    ) -> Tokenizer:
        """Build from the slow-tokenizer files ``vocab.json`` + ``merges.txt`` (Qwen2: NFC, Qwen2
        split), with added tokens from the ``added_tokens_decoder`` of ``config``."""
        config = config or {}
        vocab = _read_json(Path(vocab_path))
        lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
        merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#version")]
        added = [
            AddedToken(int(token_id), entry["content"], bool(entry.get("special", True)))
            for token_id, entry in config.get("added_tokens_decoder", {}).items()
        ]
        try:
            return cls(vocab, merges, added, backend=backend, **_names_from_config(config))
        except ValueError as e:
            raise ValueError(f"{vocab_path}, {merges_path}: {e}") from None

    # ------------------------------------------------------------------ what HF users expect
    @property
    def vocab_size(self) -> int:
        """Size of the BPE vocabulary without added tokens (HF's ``tokenizer.vocab_size``)."""
        return len(self.vocab)

    def __len__(self) -> int:
        """All tokens, BPE and added (HF's ``len(tokenizer)``); the model's embedding may be larger."""
        return len(self.vocab) + len(self.added_tokens)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every added token (``<|im_start|>`` ...) -> its id: what ``allowed_special`` may name."""
        return {content: token.id for content, token in self.added_tokens.items()}

    @property
    def eos_token_ids(self) -> list[int]:
        """The ids generation should stop at: eos, ``<|endoftext|>`` and ``<|im_end|>`` where present."""
        candidates = [self.eos_token_id, self.token_to_id("<|endoftext|>"), self.token_to_id("<|im_end|>")]
        return list(dict.fromkeys(i for i in candidates if i is not None))

    def id_to_token(self, token_id: int) -> str | None:
        """The token string (byte-level form, e.g. ``"Ġthe"``) of an id, or ``None``."""
        return self._id_to_token[token_id] if 0 <= token_id < len(self._id_to_token) else None

    def token_to_id(self, token: str) -> int | None:
        """The id of a token string (byte-level form, or an added token's content), or ``None``."""
        if token in self.added_tokens:
            return self.added_tokens[token].id
        return self.vocab.get(token)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, added_tokens={len(self.added_tokens)}, backend={self.backend!r})"

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """Token ids of ``text``.

        By default text that looks like a special token ("<|im_end|>") is encoded as ordinary
        text, so user content can never inject one. ``allowed_special="all"`` (or a set of
        token strings) turns those into their ids, exactly as HF's ``tokenizer(text)`` does.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        _check_encodable(text)
        specials = self._allowed_special(allowed_special)
        if not specials:
            return self._encode_ordinary(text)
        ids: list[int] = []
        for i, part in enumerate(_special_splitter(frozenset(specials)).split(text)):
            if i % 2:  # the split pattern captures the special tokens: they sit at odd positions
                ids.append(self.added_tokens[part].id)
            elif part:
                ids.extend(self._encode_ordinary(part))
        return ids

    def _encode_ordinary(self, text: str) -> list[int]:
        """NFC (when the checkpoint normalises), then BPE; added tokens get no special treatment."""
        return self._bpe.encode_ordinary(unicodedata.normalize("NFC", text) if self.nfc else text)

    def _allowed_special(self, allowed_special: AllowedSpecial) -> Collection[str]:
        if allowed_special == "all":
            return self.added_tokens.keys()
        if isinstance(allowed_special, str):
            raise ValueError(f"allowed_special must be 'all' or a set of token strings, got the string {allowed_special!r}")
        unknown = sorted(set(allowed_special) - self.added_tokens.keys())
        if unknown:
            raise ValueError(f"allowed_special names tokens that are not special tokens of this tokenizer: {unknown}")
        return allowed_special

    # ------------------------------------------------------------------ decoding
    def decode_bytes(self, ids: Iterable[int], skip_special_tokens: bool = False) -> bytes:
        """The raw bytes the tokens stand for (may end in the middle of a UTF-8 character)."""
        table, parts = self._id_to_bytes, []
        for token_id in ids:
            token_id = int(token_id)
            if skip_special_tokens and token_id in self._special_ids:
                continue
            data = table[token_id] if 0 <= token_id < len(table) else None
            if data is None:
                raise ValueError(f"token id {token_id} is not in the vocabulary (ids 0..{len(table) - 1}, {len(self)} tokens)")
            parts.append(data)
        return b"".join(parts)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of the tokens; bytes that are not valid UTF-8 become U+FFFD, never an error."""
        return self.decode_bytes(ids, skip_special_tokens).decode("utf-8", errors="replace")

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        """A decoder for tokens arriving one by one (generation): see :class:`StreamDecoder`."""
        return StreamDecoder(self, skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = True, tokenize: bool = False
    ) -> str | list[int]:
        """The ChatML prompt for ``messages`` -- the same string HF's chat template gives.

        ``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, the checkpoint's default system
        prompt first when the messages have none, and ``<|im_start|>assistant\\n`` when
        ``add_generation_prompt``. With ``tokenize=True`` the ids, with the special tokens placed
        structurally: "<|im_end|>" typed inside a message stays ordinary text.
        """
        segments = chat_segments(messages, self.default_system_prompt(), add_generation_prompt)
        if not tokenize:
            return "".join(text for text, _ in segments)
        ids: list[int] = []
        for text, is_special in segments:
            ids.extend([self._chat_token_id(text)] if is_special else self._encode_ordinary(text))
        return ids

    def default_system_prompt(self) -> str | None:
        """The system prompt the checkpoint's template inserts when the messages have none."""
        return default_system_prompt(self.chat_template)

    def _chat_token_id(self, token: str) -> int:
        if token not in self.added_tokens:
            raise ValueError(f"this tokenizer has no {token!r} token, which ChatML needs")
        return self.added_tokens[token].id


class StreamDecoder:
    """Decode tokens as they arrive; text comes out only once a UTF-8 character is complete.

    One token can end halfway through a character (emoji and CJK often span two tokens), so
    ``push`` keeps the incomplete bytes back until the rest arrives; ``flush`` ends the stream
    (incomplete leftovers become U+FFFD). Pushing all ids and flushing gives ``decode(ids)``.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text completed by this token ("" while a character is still incomplete)."""
        return self._utf8.decode(self.tokenizer.decode_bytes([token_id], self.skip_special_tokens))

    def flush(self) -> str:
        """Whatever is still held back, then start afresh."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


# ---------------------------------------------------------------------------- helpers
def tokenizer_directory(name_or_path: str | os.PathLike) -> Path:
    """``name_or_path`` itself when it is a directory, else :func:`minqwen.loading.hub.resolve_tokenizer`'s
    answer (a cached directory with only the tokenizer files, for a name or a ``.gguf``)."""
    directory = Path(name_or_path).expanduser()
    if directory.is_dir():
        return directory
    from .loading.hub import resolve_tokenizer  # fetching only when needed; loading never imports this module

    return resolve_tokenizer(name_or_path)


def _vocab_without_added_tokens(vocab: dict[str, int], added_tokens: list[AddedToken]) -> dict[str, int]:
    """The BPE vocabulary without the added tokens it also lists, at the same ids.

    transformers' ``save_pretrained`` writes such files (its vocab repeats ``<|endoftext|>`` ...),
    and HF ``tokenizers`` loads them. Only a real conflict is an error: an added token with two
    ids. (One id with two names is caught when the id tables are built.)
    """
    ids: dict[str, int] = {}
    for token in added_tokens:
        first = ids.setdefault(token.content, vocab.get(token.content, token.id))
        if first != token.id:
            raise ValueError(f"token {token.content!r} has two ids: {first} and {token.id}")
    return {token: token_id for token, token_id in vocab.items() if token not in ids}


def _check_encodable(text: str) -> None:
    """A str holding a lone surrogate (e.g. from a bad JSON escape) is not text: say where it is."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"text has a lone surrogate {text[e.start]!r} at index {e.start}, which is not valid Unicode; "
            f"fix the source or clean it with text.encode('utf-8', 'replace').decode()"
        ) from None


@functools.lru_cache(maxsize=64)
def _special_splitter(specials: frozenset[str]) -> re.Pattern:
    """A pattern whose ``split`` isolates the special tokens, longest first (as HF matches them)."""
    alternatives = sorted(specials, key=lambda s: (-len(s), s))
    return re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")


def _choose_backend(backend: Backend, vocab: dict[str, int], merges: list[Pair]) -> str:
    if backend not in ("auto", "tiktoken", "python"):
        raise ValueError(f"backend must be 'auto', 'tiktoken' or 'python', got {backend!r}")
    if backend == "auto":
        return "tiktoken" if tiktoken_compatible(vocab, merges) else "python"
    return backend


def _read_json(path: Path) -> Any:
    """Parse a JSON file; a broken file is a ``ValueError`` naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _split_pattern(pre_tokenizer: Mapping[str, Any] | None) -> str:
    """The regex of Qwen2's pre-tokenizer: Sequence[Split(Regex, Isolated), ByteLevel(no regex)]."""
    steps = pre_tokenizer.get("pretokenizers", []) if pre_tokenizer and pre_tokenizer.get("type") == "Sequence" else []
    split, byte_level = steps if [step.get("type") for step in steps] == ["Split", "ByteLevel"] else ({}, {})
    if (
        "Regex" not in split.get("pattern", {})
        or split.get("behavior") != "Isolated"
        or split.get("invert")
        or byte_level.get("use_regex")
        or byte_level.get("add_prefix_space")
    ):
        raise ValueError(f"unsupported pre_tokenizer {json.dumps(pre_tokenizer)[:300]}; expected Qwen2's regex Split then ByteLevel")
    return split["pattern"]["Regex"]


def _uses_nfc(normalizer: Mapping[str, Any] | None) -> bool:
    if normalizer is None:
        return False
    if normalizer.get("type") == "NFC":
        return True
    raise ValueError(f"unsupported normalizer {json.dumps(normalizer)[:200]}; expected NFC or none")


def _names_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Special-token names and chat template from a tokenizer_config.json dict."""

    def name(key: str) -> str | None:
        value = config.get(key)
        return value.get("content") if isinstance(value, Mapping) else value  # older files store AddedToken dicts

    return {
        "eos_token": name("eos_token"),
        "bos_token": name("bos_token"),
        "pad_token": name("pad_token"),
        "chat_template": config.get("chat_template"),
    }


# ---------------------------------------------------------------------------- training
def train_bpe(text: str, vocab_size: int, pattern: str = QWEN2_PATTERN) -> Tokenizer:
    """A byte-level BPE tokenizer trained on ``text``: 256 byte tokens plus up to
    ``vocab_size - 256`` merges (fewer if the text runs out of repeated pairs).

    Ids 0-255 are the bytes in order, then one id per new merged token. Uses the from-scratch
    Python backend, the one the notebook derives.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size must be at least 256 (one token per byte), got {vocab_size}")
    normalized = unicodedata.normalize("NFC", text)
    _check_encodable(normalized)
    merges = learn_merges(regex.findall(pattern, normalized), vocab_size - 256)
    vocab = {symbol: byte for byte, symbol in bytes_to_unicode().items()}
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    return Tokenizer(vocab, merges, pattern=pattern, backend="python")


def __getattr__(name: str) -> Any:
    """``tokenizer_files_from_gguf`` moved to :mod:`minqwen.loading.gguf` (deprecated path)."""
    if name == "tokenizer_files_from_gguf":
        from . import _moved
        from .loading import gguf

        return _moved.forward_to(__name__, gguf)(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
