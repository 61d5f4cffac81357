"""Tokenizer throughput: minqwen's tiktoken and Python backends next to HF ``tokenizers``.

    python -m benchmarks.tokenizer_bench             # from the repository root; 1 MB per text
    python -m benchmarks.tokenizer_bench --megabytes 4 --text prose+code --checkpoint path/to/hf-dir

Every backend encodes the same text (the same chunks, in one thread) and must return the same
ids; the table reports MB/s of UTF-8 input. Two texts: English prose with Python code (typical
use), and the tests' mixed multilingual parity corpus (:func:`build_corpus`: rare scripts, emoji,
decomposed accents -- slower for every backend). HF ``tokenizers`` is only a reference here: its
row is left out when it is not installed.
"""

from __future__ import annotations

import argparse
import os
import random
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from minqwen.tokenizer import Tokenizer, tokenizer_directory

ENGLISH = [
    "The quick brown fox jumps over the lazy dog, and nobody seems to mind.",
    "Tokenizers turn text into integers; models turn integers into predictions.",
    "In 1969, Apollo 11 landed on the Moon -- 384,400 km away -- with 47.5 seconds of fuel left.",
    "\"Why bytes?\" she asked. \"Because every string, in every script, is made of them.\"",
    "I'll've finished by five, but DON'T wait up; they'RE sure we'd've called if it mattered.",
    "Y'all'd've liked the café; its crème brûlée was naïve but the coöperative staff weren't.",
    "E-mail me at someone@example.com or visit https://example.org/path?q=1&lang=en#top.",
]
CHINESE = ["今天天气很好，我们去公园散步吧。", "机器学习模型把文字切分成词元，再把词元映射为整数。", "北京是中华人民共和国的首都。"]
JAPANESE = ["東京は日本の首都です。", "吾輩は猫である。名前はまだ無い。", "カタカナとひらがなと漢字が混ざった文章をトークン化します。"]
KOREAN = ["안녕하세요, 만나서 반갑습니다.", "토크나이저는 텍스트를 숫자로 바꿉니다.", "서울은 대한민국의 수도입니다."]
ARABIC = ["مرحبا بالعالم، كيف حالك اليوم؟", "تحول أداة التقطيع النص إلى أرقام.", "القاهرة هي عاصمة مصر."]
HINDI = ["नमस्ते दुनिया, आप कैसे हैं?", "टोकनाइज़र पाठ को संख्याओं में बदलता है।", "दिल्ली भारत की राजधानी है।"]
PROSE = [ENGLISH, CHINESE, JAPANESE, KOREAN, ARABIC, HINDI]
EMOJI = ["👨‍👩‍👧‍👦", "🧑🏽‍💻", "👩🏿‍🔬", "🏳️‍🌈", "👍🏻👍🏼👍🏽👍🏾👍🏿", "🇫🇷🇯🇵", "❤️‍🔥", "🤷‍♀️", "🙂", "😂😂😂"]
COMBINING = ["café naïve résumé Ångström", "Tiếng Việt có dấu", "한국어 자모", "e\u0301\u0302 a\u0308\u0304 o\u0338", "Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇"]
SPECIAL_LOOKING = [
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|endoftext|>",
    "<tool_call>{}</tool_call>",
    "<|im_end|<|im_",
    "<<|im_start|>|>",
    "<|fim_prefix|>x<|fim_suffix|>y<|fim_middle|>",
]
RANDOM_BLOCKS = [(0x0370, 0x03FF), (0x0400, 0x04FF), (0x0E00, 0x0E7F), (0x2200, 0x22FF), (0x1D400, 0x1D7FF), (0x20000, 0x2A6DF)]


# A small Python module (about 5 KB) kept as a data file, so the corpus never changes.
PYTHON_SOURCE = (Path(__file__).parent / "data" / "library_catalogue.txt").read_text(encoding="utf-8")


def python_sources() -> list[str]:
    """A fixed Python module (so the corpus never changes), with spaces and with tabs."""
    return [PYTHON_SOURCE, PYTHON_SOURCE.replace("    ", "\t")]


def _fragment(rng: random.Random, sources: list[str]) -> str:
    """One random piece of the corpus, of a randomly chosen kind."""
    kind = rng.randrange(12)
    if kind == 0:
        source = rng.choice(sources)
        start = rng.randrange(max(1, len(source) - 2000))
        return source[start : start + rng.randrange(200, 2000)]
    if kind == 1:
        return "".join(rng.choice("0123456789") for _ in range(rng.randrange(1, 60)))
    if kind == 2:
        return "".join(rng.choice([" ", "  ", "\t", "\n", "\r\n", "\n\n", "    "]) for _ in range(rng.randrange(1, 12)))
    if kind == 3:
        return unicodedata.normalize("NFD", rng.choice(COMBINING)) if rng.random() < 0.5 else rng.choice(COMBINING)
    if kind == 4:
        return "".join(chr(rng.randrange(*rng.choice(RANDOM_BLOCKS))) for _ in range(rng.randrange(1, 20)))
    if kind == 5:
        return rng.choice(SPECIAL_LOOKING)
    if kind == 6:
        return " ".join(rng.choice(EMOJI) for _ in range(rng.randrange(1, 6)))
    if kind == 7:
        return "\r\n".join(rng.sample(ENGLISH, 3)) + "\r\n"
    return rng.choice(rng.choice(PROSE))  # prose in one of six languages


def build_corpus(min_bytes: int = 200_000, seed: int = 0) -> str:
    """A mixed text of at least ``min_bytes`` UTF-8 bytes, the same for the same seed.

    English prose, Python source (spaces and tabs), Chinese, Japanese, Korean, Arabic, Hindi,
    emoji with ZWJ sequences and skin tones, long digit runs, whitespace runs, ``\\r\\n``,
    contractions, combining characters (also decomposed, so NFC matters), rare scripts and
    strings that look like special tokens.
    """
    rng, sources = random.Random(seed), python_sources()
    parts, size = [], 0
    while size < min_bytes:
        fragment = _fragment(rng, sources) + rng.choice([" ", "\n", "", "\n\n"])
        parts.append(fragment)
        size += len(fragment.encode("utf-8"))
    return "".join(parts)


def prose_and_code(min_bytes: int = 200_000, seed: int = 0) -> str:
    """English sentences and slices of :data:`PYTHON_SOURCE` (spaces and tabs), at least ``min_bytes``."""
    rng, sources = random.Random(seed), python_sources()
    parts, size = [], 0
    while size < min_bytes:
        if rng.random() < 0.5:
            fragment = " ".join(rng.choice(ENGLISH) for _ in range(rng.randrange(1, 6))) + "\n\n"
        else:
            source = rng.choice(sources)
            start = rng.randrange(len(source) - 1000)
            fragment = source[start : start + rng.randrange(200, 1000)] + "\n"
        parts.append(fragment)
        size += len(fragment.encode("utf-8"))
    return "".join(parts)


TEXTS: dict[str, Callable[[int], str]] = {"prose+code": prose_and_code, "mixed": build_corpus}


@dataclass
class BenchResult:
    name: str
    seconds: float
    megabytes: float

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / self.seconds


def time_encoder(name: str, encode: Callable[[str], list[int]], chunks: list[str], repeats: int) -> tuple[BenchResult, list[list[int]]]:
    """Best-of-``repeats`` wall time of encoding every chunk in turn, and the ids."""
    megabytes = sum(len(chunk.encode("utf-8")) for chunk in chunks) / 1e6
    best, ids = float("inf"), []
    for _ in range(repeats):
        start = time.perf_counter()
        ids = [encode(chunk) for chunk in chunks]
        best = min(best, time.perf_counter() - start)
    return BenchResult(name, best, megabytes), ids


def encoder_with_specials(tokenizer: Tokenizer) -> Callable[[str], list[int]]:
    """``tokenizer.encode`` with special tokens recognised, as HF's ``encode`` does."""
    return lambda text: tokenizer.encode(text, allowed_special="all")


def hf_encoder(directory: Path) -> Callable[[str], list[int]] | None:
    """HF ``tokenizers`` on the same tokenizer.json, single-threaded; ``None`` when not installed."""
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    try:
        from tokenizers import Tokenizer as HFTokenizer
    except ImportError:
        return None
    hf = HFTokenizer.from_file(str(directory / "tokenizer.json"))
    return lambda text: hf.encode(text, add_special_tokens=False).ids


def benchmark(
    text: str, fast: Tokenizer, python: Tokenizer, hf_directory: Path | None = None, chunk_chars: int = 4096, repeats: int = 3
) -> list[BenchResult]:
    """Time ``fast`` (tiktoken backend), ``python`` (one pass, its cache as it is) and, given the
    directory of the tokenizer.json, HF tokenizers -- on the same chunks of ``text``; check that
    all give the same ids."""
    chunks = [text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars)]
    encoders = {
        f"minqwen {fast.backend}": (encoder_with_specials(fast), repeats),
        f"minqwen {python.backend} (one pass)": (encoder_with_specials(python), 1),
        "HF tokenizers (1 thread)": (hf_encoder(hf_directory) if hf_directory else None, repeats),
    }
    results, outputs = [], {}
    for name, (encode, n) in encoders.items():
        if encode is not None:
            result, outputs[name] = time_encoder(name, encode, chunks, n)
            results.append(result)
    reference = next(iter(outputs.values()))
    mismatched = [name for name, ids in outputs.items() if ids != reference]
    if mismatched:
        raise AssertionError(f"backends disagree on the benchmark text: {mismatched}")
    return results


def run_benchmark(checkpoint: str, megabytes: float = 1.0, repeats: int = 3, text: str = "prose+code") -> list[BenchResult]:
    """:func:`benchmark` on ``megabytes`` of one of :data:`TEXTS`, both backends freshly loaded."""
    if text not in TEXTS:
        raise ValueError(f"unknown text {text!r}; choose one of {list(TEXTS)}")
    directory = tokenizer_directory(checkpoint)
    fast = Tokenizer.from_pretrained(directory, backend="tiktoken")
    python = Tokenizer.from_pretrained(directory, backend="python")  # a cold cache: a fair first pass
    return benchmark(TEXTS[text](int(megabytes * 1e6)), fast, python, directory, repeats=repeats)


def format_table(results: list[BenchResult]) -> str:
    """A plain-text table; speed-ups are relative to HF tokenizers when it ran."""
    baseline = next((r for r in results if r.name.startswith("HF")), None)
    lines = [f"{'backend':<30} {'MB':>6} {'seconds':>8} {'MB/s':>8} {'vs HF':>7}"]
    for r in results:
        ratio = f"{r.mb_per_s / baseline.mb_per_s:6.1f}x" if baseline else "      -"
        lines.append(f"{r.name:<30} {r.megabytes:6.2f} {r.seconds:8.3f} {r.mb_per_s:8.2f} {ratio:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from minqwen.hub import DEFAULT_CHECKPOINT

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="checkpoint name, .gguf file or HF directory")
    parser.add_argument("--megabytes", type=float, default=1.0, help="size of each test text")
    parser.add_argument("--repeats", type=int, default=3, help="best of this many runs (the Python backend runs once)")
    parser.add_argument("--text", choices=list(TEXTS), action="append", help="which text (default: all)")
    args = parser.parse_args(argv)
    for text in args.text or list(TEXTS):
        print(f"\n{text}: {args.megabytes:g} MB")
        print(format_table(run_benchmark(args.checkpoint, args.megabytes, args.repeats, text)))


if __name__ == "__main__":
    main()
