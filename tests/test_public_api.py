"""The public API: what ``minqwen`` exports, and every import path the README and notebooks use.

Names that moved keep their old path for one release: reaching one through a shim module (a
module-level ``__getattr__``) must emit a DeprecationWarning that names the new path.
"""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
import types
from pathlib import Path

import torch

import minqwen

ROOT = Path(__file__).resolve().parent.parent
CLASSES = {"KVCache", "Chat", "Qwen2Config", "Tokenizer"}
MODULES = {"Qwen2DecoderLayer", "Qwen2ForCausalLM", "Qwen2Model"}  # torch.nn.Module subclasses
FUNCTIONS = {"from_pretrained", "save_pretrained", "generate", "stream", "lm_loss", "quantize"}
SUBMODULES = {"hub"}
DOCUMENTED = CLASSES | MODULES | FUNCTIONS | SUBMODULES  # more may be added, none removed


def test_every_exported_name_is_there_and_of_its_kind():
    assert DOCUMENTED <= set(minqwen.__all__), f"missing from minqwen.__all__: {sorted(DOCUMENTED - set(minqwen.__all__))}"
    namespace: dict = {}
    exec("from minqwen import *", namespace)
    assert set(minqwen.__all__) <= set(namespace), f"in __all__ but not importable: {sorted(set(minqwen.__all__) - set(namespace))}"
    for name in minqwen.__all__:
        obj = getattr(minqwen, name)
        if name in MODULES:
            assert inspect.isclass(obj) and issubclass(obj, torch.nn.Module), name
        elif name in CLASSES:
            assert inspect.isclass(obj), name
        elif name in FUNCTIONS:
            assert inspect.isfunction(obj), f"minqwen.{name} should be a function, is {obj!r}"
        elif name in SUBMODULES:
            assert isinstance(obj, types.ModuleType) and obj.__name__.startswith("minqwen."), name
        else:  # a name added since: a class, a function or a module of the package
            assert inspect.isclass(obj) or inspect.isfunction(obj) or isinstance(obj, types.ModuleType), name
        assert inspect.getdoc(obj), f"minqwen.{name} has no docstring"


def test_public_functions_have_type_hints():
    for name in sorted(FUNCTIONS):
        signature = inspect.signature(getattr(minqwen, name))
        unannotated = [p.name for p in signature.parameters.values() if p.annotation is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        assert not unannotated, f"minqwen.{name}: parameters without a type hint: {unannotated}"
        assert signature.return_annotation is not inspect.Signature.empty, f"minqwen.{name} has no return type hint"


# ----------------------------------------------------------------- paths the README and notebooks use
FROM_IMPORT = re.compile(r"from (minqwen(?:\.\w+)*) import (?:\(([\w\s,]+)\)|([\w ,]+))")
DOTTED = re.compile(r"\bminqwen((?:\.[a-z_]\w*)+)\.(\w+)")


def documented_paths() -> set[tuple[str, str]]:
    """(module, name) for every ``from minqwen.x import name`` and ``minqwen.x.name`` in README.md and the notebooks' code."""
    texts = [(ROOT / "README.md").read_text(encoding="utf-8")]
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
        texts += ["".join(c["source"]) for c in cells if c["cell_type"] == "code"]
    paths = set()
    for text in texts:
        for module, in_parentheses, on_one_line in FROM_IMPORT.findall(text):
            paths |= {(module, n.strip()) for n in (in_parentheses or on_one_line).split(",") if n.strip()}
        paths |= {(f"minqwen{module}", name) for module, name in DOTTED.findall(text)}
    return paths


PROBE = """
import importlib, json, sys, warnings
results = {}
for module, name in json.loads(sys.argv[1]):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            mod = importlib.import_module(module)
            shim = hasattr(mod, "__getattr__") and name not in vars(mod)
            exec(f"from {module} import {name}", {})
            error = None
        except Exception as e:
            shim, error = False, f"{type(e).__name__}: {e}"
    deprecations = [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]
    results[f"{module}.{name}"] = {"error": error, "shim": shim, "deprecations": deprecations}
print(json.dumps(results))
"""


def test_every_import_path_in_the_readme_and_notebooks_works_and_moved_ones_warn():
    paths = sorted(documented_paths())
    assert len(paths) > 20, paths  # the scan itself works
    # a fresh interpreter: a module imported once by an earlier test would not warn again
    result = subprocess.run([sys.executable, "-c", PROBE, json.dumps(paths)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    problems = []
    for path, found in json.loads(result.stdout).items():
        if found["error"]:
            problems.append(f"{path}: {found['error']}")
        elif found["shim"] and not any("minqwen" in message for message in found["deprecations"]):
            problems.append(f"{path}: reached through a shim without a DeprecationWarning naming its new path")
    assert not problems, "import paths used by README.md or the notebooks:\n" + "\n".join(problems)
