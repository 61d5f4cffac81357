"""Clear execution counts and execution timestamps from notebooks, in place (see `make strip`).

nbval compares outputs, not counts, so nothing it checks is lost; what goes is what changes on
every run and would make each re-execution a diff: ``execution_count`` of cells and results, and
the ``execution`` timestamps Jupyter writes into cell metadata. Written back as Jupyter writes
notebooks (one-space indent, sorted keys, UTF-8), so an already clean notebook is unchanged.

    python tools/strip_notebooks.py notebooks/*.ipynb
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def strip(notebook: dict) -> dict:
    """The notebook without execution counts and execution metadata (the same dict, changed)."""
    for cell in notebook["cells"]:
        cell.get("metadata", {}).pop("execution", None)
        if cell["cell_type"] == "code":
            cell["execution_count"] = None
            for output in cell.get("outputs", []):
                if "execution_count" in output:
                    output["execution_count"] = None
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
