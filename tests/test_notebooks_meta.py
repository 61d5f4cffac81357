"""The notebooks as files: nothing volatile or machine-specific stored, and every link resolves.

``make strip`` (tools/strip_notebooks.py) removes execution counts and timestamps.
"""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.*?)\s*#*\s*$", re.M)
# a path on one machine: home directories, this checkout, temporary and system directories
ABSOLUTE_PATH = re.compile(r"(?<![\w.~/-])(?:/(?:home|Users|root|work|tmp|var|private|usr|opt)/[^\s\"']*|[A-Za-z]:\\\\[^\s\"']*)")

sys.path.insert(0, str(ROOT / "tools"))
from strip_notebooks import strip  # noqa: E402


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def markdown_of(path: Path) -> str:
    """The Markdown a link may point into: a notebook's markdown cells, or a .md file."""
    if path.suffix == ".ipynb":
        return "\n".join("".join(c["source"]) for c in load(path)["cells"] if c["cell_type"] == "markdown")
    return path.read_text(encoding="utf-8")


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    return {re.sub(r"[^\w\- ]", "", unquote(h).lower()).replace(" ", "-") for h in HEADING.findall(markdown)}


def dead_links(source: Path) -> list[str]:
    """Relative links in ``source``'s Markdown whose file or heading anchor does not exist."""
    dead = []
    for target in LINK.findall(markdown_of(source)):
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto: -- not checked offline
            continue
        file_part, _, anchor = target.partition("#")
        linked = (source.parent / unquote(file_part)).resolve() if file_part else source
        if not linked.exists():
            dead.append(f"{target}: no file {linked.relative_to(ROOT) if linked.is_relative_to(ROOT) else linked}")
        elif anchor and linked.suffix in (".md", ".ipynb") and anchor not in anchors(markdown_of(linked)):
            dead.append(f"{target}: no heading with anchor #{anchor} in {linked.name}")
    return dead


def volatile_fields(notebook: dict) -> list[str]:
    """Where the notebook stores timestamps, or counts other than one fresh run's: ``cell 3: execution_count``."""
    clean = strip(copy.deepcopy(notebook))
    found = []
    for number, (cell, fresh) in enumerate(zip(notebook["cells"], clean["cells"])):
        if "execution" in cell.get("metadata", {}):
            found.append(f"cell {number}: metadata.execution")
        counts = lambda c: [c.get("execution_count"), *(o.get("execution_count") for o in c.get("outputs", []))]  # noqa: E731
        if counts(cell) != counts(fresh):
            found.append(f"cell {number}: execution_count")
    return found


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_timestamps_and_counts_of_one_fresh_run(notebook):
    found = volatile_fields(load(notebook))
    assert not found, f"{notebook.name}: {len(found)} execution timestamps or counts not 1..N, run `make strip`: {found[:6]}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_no_absolute_paths(notebook):
    found = sorted(set(ABSOLUTE_PATH.findall(notebook.read_text(encoding="utf-8"))))
    assert not found, f"{notebook.name} stores paths of one machine (in its source or outputs): {found[:10]}"


@pytest.mark.parametrize("document", [ROOT / "README.md", *NOTEBOOKS], ids=["README", *[p.stem for p in NOTEBOOKS]])
def test_links_resolve(document):
    dead = dead_links(document)
    assert not dead, f"dead links in {document.name}:\n" + "\n".join(dead)


def test_the_checks_can_fail(tmp_path):
    """Each check on a small bad notebook: a count, a timestamp, a path, a dead file and a dead anchor."""
    (tmp_path / "README.md").write_text("# Title\n## Runs on\n")
    cell = {"cell_type": "code", "execution_count": 3, "source": ["print(1)"], "id": "a", "metadata": {"execution": {"iopub.status.idle": "2026"}},
            "outputs": [{"output_type": "stream", "name": "stdout", "text": ["saved in /home/me/x\n"]}], "source": []}
    text = "[next](02_missing.ipynb) [ok](README.md#runs-on) [bad](README.md#performance) [web](https://example.com)"
    notebook = {"cells": [{"cell_type": "markdown", "id": "b", "metadata": {}, "source": [text]}, cell],
                "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    path = tmp_path / "01_x.ipynb"
    path.write_text(json.dumps(notebook))
    assert volatile_fields(load(path)) == ["cell 1: metadata.execution", "cell 1: execution_count"]
    assert volatile_fields(strip(load(path))) == []
    assert ABSOLUTE_PATH.findall(path.read_text()) == ["/home/me/x\\n"]
    assert [d.split(":")[0] for d in dead_links(path)] == ["02_missing.ipynb", "README.md#performance"]
