"""Normalise execution counts and drop execution timestamps in notebooks, in place (`make strip`).

What changes on every run and would make each re-execution a diff goes: the ``execution``
timestamps Jupyter writes into cell metadata, and the counts of an interactive session (which
jump and repeat as cells are re-run). Counts are renumbered 1, 2, 3, ... over the non-empty code
cells, as one run from top to bottom in a fresh kernel numbers them. They are not cleared: nbval
treats a cell without a count as never run and fails it if it has outputs. Written back as Jupyter writes
notebooks (one-space indent, sorted keys, UTF-8), so an already clean notebook is unchanged.

    python tools/strip_notebooks.py notebooks/*.ipynb
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def strip(notebook: dict) -> dict:
    """The notebook without execution metadata, its counts those of one fresh run (the same dict, changed)."""
    count = 0
    for cell in notebook["cells"]:
        cell.get("metadata", {}).pop("execution", None)
        if cell["cell_type"] == "code":
            count += bool("".join(cell.get("source", "")).strip())
            cell["execution_count"] = count if "".join(cell.get("source", "")).strip() else None
            for output in cell.get("outputs", []):
                if "execution_count" in output:
                    output["execution_count"] = cell["execution_count"]
    return notebook


def notebook_text(notebook: dict) -> str:
    return json.dumps(notebook, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def main(paths: list[str]) -> int:
    if not paths:
        print(__doc__.strip().splitlines()[-1].strip(), file=sys.stderr)
        return 2
    for path in map(Path, paths):
        before = path.read_text(encoding="utf-8")
        after = notebook_text(strip(json.loads(before)))
        if after != before:
            path.write_text(after, encoding="utf-8")
            print(f"stripped {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
