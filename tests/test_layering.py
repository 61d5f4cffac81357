"""The package's layering: no import cycles (lazy imports count), an import that needs nothing
POSIX-only and warns about nothing, and no benchmark harness inside ``minqwen/``.

Modules are found by walking ``minqwen/``, so the test follows modules wherever they move.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = "minqwen"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE


def module_name(path: Path) -> str:
    """``minqwen/loading/gguf.py`` -> ``minqwen.loading.gguf``; a package's ``__init__`` is the package."""
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    """Every module of the package, by dotted name."""
    return {module_name(path): path for path in sorted(PACKAGE_DIR.rglob("*.py"))}


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """The package modules that ``name`` imports anywhere in its file (functions included), with line numbers.

    ``from .x import y`` imports ``x``, or ``x.y`` alone when ``y`` is itself a module (``from . import hub``).
    """
    is_package = path.name == "__init__.py"
    edges = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: level 1 is this module's package
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # each name is a submodule (``from . import hub``) or else something the module ``base`` defines
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules and target.startswith(PACKAGE + "."):
                target = target.rsplit(".", 1)[0]  # minqwen.hub.resolve -> minqwen.hub
            if target in modules and target != name:
                edges.append((target, node.lineno))
    return edges


def import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported module: first line that imports it}."""
    modules = package_modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in modules.items():
        graph[name] = {}
        for target, line in imported_modules(name, path, modules):
            graph[name].setdefault(target, line)
    return graph


def tangles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan): the modules caught in cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle through each tangle."""
    return [shortest_cycle(graph, component) for component in tangles(graph)]


def shortest_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """The shortest cycle through the component's first module (breadth-first inside the component)."""
    start, members = component[0], set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        next_frontier = []
        for node in frontier:
            for succ in sorted(graph[node]):
                if succ == start:
                    return paths[node] + [start]
                if succ in members and succ not in paths:
                    paths[succ] = paths[node] + [succ]
                    next_frontier.append(succ)
        frontier = next_frontier
    raise AssertionError(f"no cycle through {start} in {component}")  # cannot happen for an SCC


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    """``a -> b (a.py:12) -> c (b.py:30) -> a (c.py:7)``: where each import is written."""
    modules = package_modules()
    steps = [cycle[0]]
    for source, target in zip(cycle, cycle[1:]):
        where = modules[source].relative_to(PACKAGE_DIR.parent)
        steps.append(f"{target} ({where}:{graph[source][target]})")
    return " -> ".join(steps)


def test_the_graph_sees_relative_absolute_and_lazy_imports(tmp_path, monkeypatch):
    """The graph builder itself, on a small fake package: each import form gives its edge, and a cycle is found."""
    fake = tmp_path / PACKAGE
    (fake / "sub").mkdir(parents=True)
    (fake / "__init__.py").write_text("from . import a\n")
    (fake / "a.py").write_text("from .sub.b import thing\n")
    (fake / "sub" / "__init__.py").write_text("")
    (fake / "sub" / "b.py").write_text("import minqwen.c\n")
    (fake / "c.py").write_text("def late():\n    from minqwen.sub import b\n    from .a import x\n    from . import Thing\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE_DIR", fake)
    graph = import_graph()
    assert graph == {
        "minqwen": {"minqwen.a": 1},
        "minqwen.a": {"minqwen.sub.b": 1},
        "minqwen.sub": {},
        "minqwen.sub.b": {"minqwen.c": 1},
        "minqwen.c": {"minqwen.sub.b": 2, "minqwen.a": 3, "minqwen": 4},  # `from minqwen.sub import b` is sub.b, not sub
    }
    assert cycles(graph) == [["minqwen", "minqwen.a", "minqwen.sub.b", "minqwen.c", "minqwen"]]


def test_no_import_cycles():
    graph = import_graph()
    report = []
    for component in tangles(graph):
        report.append("cycle: " + describe(graph, shortest_cycle(graph, component)))
        report += [f"    {a} imports {b} (line {graph[a][b]})" for a in component for b in graph[a] if b in component]
    assert not report, "import cycles in minqwen (lazy imports inside functions count too):\n" + "\n".join(report)


def run_python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=120, cwd=PACKAGE_DIR.parent
    )


def test_import_needs_no_posix_only_module():
    """Windows has no ``fcntl``: ``import minqwen`` must not need it."""
    result = run_python("-c", "import sys; sys.modules['fcntl'] = None; import minqwen")
    assert result.returncode == 0, result.stderr


def test_import_warns_about_nothing():
    """Importing the package itself must not trip a DeprecationWarning (a shim imported by the package would)."""
    result = run_python("-W", "error::DeprecationWarning", "-c", "import minqwen")
    assert result.returncode == 0, result.stderr


def test_no_benchmark_harness_in_the_package():
    """Benchmarks live in ``benchmarks/``; the package holds library code only."""
    harnesses = [name for name in package_modules() if name.rsplit(".", 1)[-1].startswith("bench") or "_bench" in name]
    assert not harnesses, f"benchmark harnesses inside {PACKAGE}/ (move them to benchmarks/): {harnesses}"


# Standard-library names newer than Python 3.10, the lowest version pyproject.toml's requires-python admits.
NEWER_THAN_3_10 = {"tomllib", "typing.Self", "typing.Never", "typing.LiteralString", "typing.assert_never",
                   "typing.reveal_type", "typing.Required", "typing.NotRequired", "typing.TypeVarTuple",
                   "typing.Unpack", "enum.StrEnum", "datetime.UTC", "asyncio.TaskGroup", "hashlib.file_digest",
                   "ExceptionGroup", "BaseExceptionGroup"}


def test_the_package_needs_nothing_newer_than_python_3_10():
    """requires-python = ">=3.10" is a promise: no 3.11+ syntax (``except*``) and no 3.11+ standard-library name."""
    problems = []
    for name, path in package_modules().items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=(3, 10))  # SyntaxError on newer syntax
        for node in ast.walk(tree):
            used = set()
            if isinstance(node, ast.Import):
                used = {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                used = {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
                used = {f"{node.value.id}.{node.attr}"}
            elif isinstance(node, ast.Name):
                used = {node.id}
            problems += [f"{path.relative_to(PACKAGE_DIR.parent)}:{node.lineno}: {u}" for u in sorted(used & NEWER_THAN_3_10)]
    assert not problems, "Python 3.11+ only, but requires-python is >=3.10:\n" + "\n".join(problems)
