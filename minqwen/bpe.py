"""Byte-level BPE from scratch: the byte table, the regex split, merges by rank, and a trainer.

Qwen2 reads text as UTF-8 *bytes*, so every string -- any language, any emoji -- is encodable
with no unknown token. The steps (GPT-2's recipe, which Qwen2 keeps):

1. A regex splits the text into pieces (words with their leading space, single digits,
   punctuation runs, newlines ...). Merges never cross a piece boundary.
2. Each piece becomes its UTF-8 bytes, each byte written as one printable character
   (:func:`bytes_to_unicode`), so tokens are ordinary strings: " the" is ``"Ġthe"``.
3. Merges, learned once on a large corpus, are applied lowest rank first: the adjacent pair
   that was most frequent during training is glued first, until no listed pair is left.
4. Each resulting symbol is looked up in the vocabulary to get its id.

:class:`PythonBPE` does exactly that, readably; :class:`TiktokenBPE` hands the same ranks and
pattern to tiktoken's Rust core, which gives the same ids when the merges are "rank ordered"
(:func:`tiktoken_compatible`). :func:`learn_merges` trains merges on a small text, and
:func:`byte_level_tokenizer_json` writes a vocabulary as HF's ``tokenizer.json``.
"""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any, Iterable, Mapping, Sequence

import regex

Pair = tuple[str, str]

# Qwen2's pre-tokeniser: contractions, letter runs (with one leading non-letter), single digits,
# punctuation runs, newlines, and whitespace -- a space stays attached to the word after it.
QWEN2_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each of the 256 byte values -> one printable Unicode character.

    Printable Latin-1 bytes map to themselves ("a" -> "a"); the rest (control bytes, space, ...)
    are shifted to unused code points from 256 up, so a space becomes "Ġ" and a newline "Ċ".
    Tokens then never contain whitespace or control characters, which keeps vocab files readable.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return dict(sorted(table.items()))


@functools.cache
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of :func:`bytes_to_unicode`."""
    return {char: b for b, char in bytes_to_unicode().items()}


def token_to_bytes(token: str) -> bytes:
    """A byte-level token string ("Ġthe") -> the bytes it stands for (b" the")."""
    table = unicode_to_bytes()
    try:
        return bytes(table[char] for char in token)
    except KeyError as e:
        raise ValueError(f"token {token!r} has the character {e.args[0]!r}, which is not in the byte-level alphabet") from None


def bytes_to_symbols(data: bytes) -> list[str]:
    """b" hi" -> ["Ġ", "h", "i"]: one byte-level symbol per byte, before any merge."""
    table = bytes_to_unicode()
    return [table[b] for b in data]


def merge_pair(symbols: Sequence[str], pair: Pair) -> list[str]:
    """One merge step: glue every non-overlapping occurrence of ``pair``, left to right.

    >>> merge_pair(["a", "a", "a", "b"], ("a", "a"))
    ['aa', 'a', 'b']
    """
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def apply_merges(symbols: list[str], ranks: dict[Pair, int]) -> list[str]:
    """Merge the lowest-ranked adjacent pair (leftmost on ties) until no listed pair is left."""
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        symbols = merge_pair(symbols, best)
    return symbols


def check_vocabulary(vocab: dict[str, int], merges: Sequence[Pair]) -> None:
    """Raise ``ValueError`` unless every byte and every merge result has an id."""
    missing_bytes = [char for char in bytes_to_unicode().values() if char not in vocab]
    if missing_bytes:
        raise ValueError(f"the vocabulary lacks {len(missing_bytes)} of the 256 byte symbols, e.g. {missing_bytes[:5]}")
    for rank, pair in enumerate(merges):
        if len(pair) != 2 or not all(isinstance(symbol, str) and symbol for symbol in pair):
            raise ValueError(f"merge {rank} is {pair!r}, not a pair of two non-empty token strings")
        left, right = pair
        if left + right not in vocab:
            raise ValueError(f"merge {rank} ({left!r}, {right!r}) makes {left + right!r}, which is not in the vocabulary")


class PythonBPE:
    """The from-scratch encoder: regex split, then :func:`apply_merges` per piece (cached).

    Like :class:`TiktokenBPE` it expects a vocabulary that passed :func:`check_vocabulary`.
    """

    def __init__(self, vocab: dict[str, int], merges: Sequence[Pair], pattern: str, cache_size: int = 1 << 16) -> None:
        self.vocab = vocab
        self.ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        self.pattern = regex.compile(pattern)
        # Text repeats words a lot: caching piece -> ids makes the Python loop affordable.
        self.encode_piece = functools.lru_cache(maxsize=cache_size)(self._encode_piece)

    def _encode_piece(self, piece: str) -> tuple[int, ...]:
        symbols = apply_merges(bytes_to_symbols(piece.encode("utf-8")), self.ranks)
        return tuple(self.vocab[symbol] for symbol in symbols)

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of ``text`` with no special-token handling (``text`` is already normalised)."""
        ids: list[int] = []
        for piece in self.pattern.findall(text):
            ids.extend(self.encode_piece(piece))
        return ids


def tiktoken_compatible(vocab: dict[str, int], merges: Sequence[Pair], exhaustive: bool = False) -> bool:
    """Whether tiktoken's rule gives the same ids as ours for this vocabulary.

    tiktoken glues the adjacent pair whose *result* has the lowest id; HF and :class:`PythonBPE`
    glue the pair with the lowest *merge rank*. They agree on every text when

    1. every multi-byte token is made by exactly one merge, with ids increasing in merge order
       (cheap: checked whenever a tokenizer loads), and
    2. every token's own bytes encode to that one token (``exhaustive=True``: seconds for a
       150K vocabulary, so the tests run it for the real checkpoint rather than every load).

    Under (1), if (2) holds for all shorter tokens, both rules make the same merges on a token's
    bytes until the last one, so (2) for that token means tiktoken's last merge is the listed
    one; by induction tiktoken then only ever makes listed merges, in rank order -- ours. BPE
    trained the usual way (Qwen2's tiktoken file, :func:`learn_merges`) satisfies both.
    """
    result_ids = [vocab.get(left + right, -1) for left, right in merges]
    increasing = all(a < b for a, b in zip(result_ids, result_ids[1:])) and all(i >= 0 for i in result_ids)
    if not (increasing and len(vocab) == 256 + len(merges)):
        return False
    if exhaustive:
        ranks = {tuple(pair): rank for rank, pair in enumerate(merges)}
        return all(apply_merges(list(token), ranks) == [token] for token in vocab if len(token) > 1)
    return True


class TiktokenBPE:
    """The fast path: the same ranks and pattern in a ``tiktoken.Encoding`` (Rust)."""

    def __init__(self, vocab: dict[str, int], merges: Sequence[Pair], pattern: str) -> None:
        import tiktoken

        if not tiktoken_compatible(vocab, merges):
            raise ValueError("this vocabulary's merges are not rank ordered, so tiktoken would give other ids; use backend='python'")
        ranks = {token_to_bytes(token): token_id for token, token_id in vocab.items()}
        self.encoding = tiktoken.Encoding(name="minqwen", pat_str=pattern, mergeable_ranks=ranks, special_tokens={})

    def encode_ordinary(self, text: str) -> list[int]:
        """Ids of ``text`` with no special-token handling (``text`` is already normalised)."""
        return self.encoding.encode_ordinary(text)


def learn_merges(pieces: Iterable[str], num_merges: int) -> list[Pair]:
    """Train byte-level BPE: repeatedly merge the most frequent adjacent pair.

    ``pieces`` are the regex pieces of a training text. Each distinct piece is kept once with
    its count; ties between equally frequent pairs go to the smaller pair, so training is
    deterministic. Stops early when no pair occurs twice (nothing left worth merging).
    """
    counts = Counter(pieces)
    words = [bytes_to_symbols(piece.encode("utf-8")) for piece in counts]
    frequency = list(counts.values())
    merges: list[Pair] = []
    for _ in range(num_merges):
        pair_counts: Counter[Pair] = Counter()
        for symbols, n in zip(words, frequency):
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += n
        if not pair_counts:
            break
        best = min(pair_counts, key=lambda pair: (-pair_counts[pair], pair))
        if pair_counts[best] < 2:
            break
        merges.append(best)
        words = [merge_pair(symbols, best) if len(symbols) > 1 else symbols for symbols in words]
    return merges


def byte_level_tokenizer_json(
    vocab: Mapping[str, int],
    merges: Sequence[Pair],
    added_tokens: Iterable[tuple[int, str, bool]] = (),
    pattern: str = QWEN2_PATTERN,
    nfc: bool = True,
) -> dict[str, Any]:
    """HF's ``tokenizer.json`` for a byte-level BPE with Qwen2's pipeline, as Qwen's official file has it.

    NFC (when ``nfc``), the regex split, then ``ByteLevel`` (bytes to symbols only); the decoder
    maps symbols back to bytes. ``added_tokens`` are (id, content, special) triples, matched whole.
    HF ``tokenizers``, transformers and :class:`minqwen.Tokenizer` all load the result.
    """
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
    added = [
        {"id": i, "content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": special}
        for i, content, special in added_tokens
    ]
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"} if nfc else None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [{"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False}, byte_level],
        },
        "post_processor": byte_level,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": dict(vocab),
            "merges": [list(pair) for pair in merges],
        },
    }
