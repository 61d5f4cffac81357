"""Every ```python block of README.md runs: the README's examples are the public API.

Each block is one test case, named after the heading above it (``use-it-from-python-1``). It runs
on a tiny model: ``minqwen.from_pretrained``, ``minqwen.Tokenizer.from_pretrained`` and
``minqwen.hub.resolve`` map any name or path that does not exist here ("qwen2.5-coder-0.5b-instruct",
"path/to/Qwen2-0.5B", "~/models/...") to the tiny checkpoint of ``conftest.tiny_checkpoint``, and
``Qwen2Config.qwen2_0_5b()`` gives a tiny config with Qwen's vocabulary. Blocks run in a temporary
working directory, with a private cache.

An HTML comment on the line before a block changes how it runs:

- ``<!-- test: continues -->``: the block continues the python block before it (it uses its
  variables); that block runs first, in the same namespace.
- ``<!-- test: real -->``: the block also runs on the real weights, unchanged (marked ``real``),
  after the blocks it continues. Blocks that continue it run on the tiny model only.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import tiny_config

import minqwen

README = Path(__file__).resolve().parent.parent / "README.md"
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")
OPTIONS = re.compile(r"^<!--\s*test:\s*(.*?)\s*-->\s*$")
KNOWN_OPTIONS = {"continues", "real"}


@dataclass(frozen=True)
class Block:
    """One ```python block: where it is, its code and its ``<!-- test: ... -->`` options."""

    name: str  # the heading's anchor and the block's number under it: "tokenizer-1"
    line: int  # README line of the block's first line of code
    code: str
    options: frozenset[str]
    previous: Block | None  # the python block before it, if any

    def chain(self) -> list[Block]:
        """The blocks to run, in order: this one after the blocks it continues."""
        return (self.previous.chain() if "continues" in self.options and self.previous else []) + [self]


def anchor(heading: str) -> str:
    """The heading's GitHub anchor: ``Use it from Python`` -> ``use-it-from-python``."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).strip().replace(" ", "-")


def python_blocks(markdown: str) -> list[Block]:
    """The ```python blocks of a Markdown text, with their headings and options."""
    blocks: list[Block] = []
    heading, count_under_heading, options = "readme", 0, frozenset()
    fence, code, start = None, [], 0
    for number, line in enumerate(markdown.splitlines(), start=1):
        if fence is not None:  # inside a code block
            if line.strip() == "```":
                if fence == "python":
                    count_under_heading += 1
                    previous = blocks[-1] if blocks else None
                    name = f"{anchor(heading)}-{count_under_heading}"
                    blocks.append(Block(name, start, "\n".join(code) + "\n", options, previous))
                fence, code, options = None, [], frozenset()
            else:
                code.append(line)
        elif line.startswith("```"):
            fence, start = line[3:].strip(), number + 1
        elif match := HEADING.match(line):
            heading, count_under_heading = match.group(2), 0
        elif match := OPTIONS.match(line):
            options = frozenset(o.strip() for o in match.group(1).split(","))
            unknown = options - KNOWN_OPTIONS
            if unknown:
                raise ValueError(f"README.md line {number}: unknown test option(s) {sorted(unknown)}; known: {sorted(KNOWN_OPTIONS)}")
        elif line.strip():
            options = frozenset()  # options apply to the block right below them
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))
CASES = [pytest.param(block, False, id=block.name) for block in BLOCKS] + [
    pytest.param(block, True, id=f"{block.name}-real", marks=pytest.mark.real) for block in BLOCKS if "real" in block.options
]


@pytest.fixture
def names_to_tiny_checkpoint(tiny_checkpoint, monkeypatch):
    """Point the README's checkpoint names and example paths at the tiny checkpoint."""

    def tiny_unless_here(name_or_path):
        exists = Path(os.path.expanduser(os.fspath(name_or_path))).exists()
        return name_or_path if exists else tiny_checkpoint

    from_pretrained = minqwen.from_pretrained
    tokenizer_from_pretrained = minqwen.Tokenizer.from_pretrained
    resolve = minqwen.hub.resolve
    monkeypatch.setattr(minqwen, "from_pretrained", lambda name, *a, **kw: from_pretrained(tiny_unless_here(name), *a, **kw))
    monkeypatch.setattr(
        minqwen.Tokenizer, "from_pretrained", classmethod(lambda cls, name, *a, **kw: tokenizer_from_pretrained(tiny_unless_here(name), *a, **kw))
    )
    monkeypatch.setattr(minqwen.hub, "resolve", lambda name, *a, **kw: resolve(tiny_unless_here(name), *a, **kw))
    monkeypatch.setattr(minqwen.Qwen2Config, "qwen2_0_5b", classmethod(lambda cls: tiny_config(vocab_size=151936)))


def run_block(block: Block) -> None:
    """Run the block's chain in one fresh namespace; the traceback points at README.md's lines."""
    namespace: dict = {"__name__": "__readme__"}
    for step in block.chain():
        code = compile("\n" * (step.line - 1) + step.code, str(README), "exec")  # README line numbers
        try:
            exec(code, namespace)
        except Exception as error:
            role = "" if step is block else f", run first because block {block.name} continues it"
            raise AssertionError(f"README.md block {step.name} (line {step.line}{role}) failed: {error!r}") from error


@pytest.mark.parametrize("block,real", CASES)
def test_readme_block_runs(block, real, request, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks write files such as "my-copy" or "my-adapter"
    if not real:
        request.getfixturevalue("names_to_tiny_checkpoint")
    run_block(block)


def test_blocks_headings_and_options_are_parsed():
    markdown = "\n".join([
        "# Title", "```python", "a = 1", "```", "## Use it: twice", "```bash", "not python", "```",
        "<!-- test: real -->", "```python", "b = a", "```", "text", "<!-- test: continues -->", "",
        "```python", "c = b", "```", "<!-- test: real -->", "text in between", "```python", "d = 4", "```",
    ])
    blocks = python_blocks(markdown)
    assert [(b.name, b.line, b.code, set(b.options)) for b in blocks] == [
        ("title-1", 3, "a = 1\n", set()),
        ("use-it-twice-1", 11, "b = a\n", {"real"}),
        ("use-it-twice-2", 17, "c = b\n", {"continues"}),
        ("use-it-twice-3", 22, "d = 4\n", set()),
    ]
    assert [b.name for b in blocks[2].chain()] == ["use-it-twice-1", "use-it-twice-2"]
    with pytest.raises(ValueError, match="unknown test option"):
        python_blocks("<!-- test: maybe -->\n```python\nx = 1\n```\n")


def test_a_failing_block_is_named_with_its_readme_line():
    block = python_blocks("## Broken example\n\n```python\nx = 1\nundefined_name\n```\n")[0]
    with pytest.raises(AssertionError, match=r"block broken-example-1 \(line 4\) failed: NameError"):
        run_block(block)
