"""The import graph of runtime/ and export/ has no cycles, and `import runtime` stays light.

Every import counts, wherever it stands: at module level, inside a function, under
`if TYPE_CHECKING:`. An import moved into a function only postpones a cycle to the first call; the
two modules still need each other, so the design still has the loop. The graph is read from the
source with `ast` (nothing is imported), so a cycle is found even on a path no test executes.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ("runtime", "export")
MAX_CYCLES_LISTED = 50


@dataclass(frozen=True)
class Edge:
    """MODULE imports TARGET at LINE of its file; WHERE says how (module level, in a function, ...)."""

    module: str
    target: str
    line: int
    where: str


def module_files(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Module name -> file, for every .py under the packages (a package is its __init__.py)."""
    found = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _context(tree: ast.Module) -> dict[ast.AST, str]:
    """For each import node, where it stands: 'module level', 'in f()', 'under TYPE_CHECKING'."""
    where: dict[ast.AST, str] = {}

    def visit(node: ast.AST, label: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                where[child] = label
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"in {child.name}()")
            elif isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), "under TYPE_CHECKING")
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), label)
            else:
                visit(child, label)

    visit(tree, "module level")
    return where


def _resolve_base(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute name a `from {'.' * level}{name} import ...` in MODULE refers to."""
    if level == 0:
        return name or ""
    package = module if is_package else module.rpartition(".")[0]
    for _ in range(level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{name}" if name else package


def _lazy_targets(tree: ast.Module, module: str, is_package: bool, known: set[str]) -> list[tuple[str, int]]:
    """Modules a lazy loader imports by name: string literals like ".pipeline" in module-level tables.

    runtime/__init__.py (`_LAZY`, read by `__getattr__`) and runtime/families/__init__.py (`FAMILIES`)
    import submodules through `importlib.import_module(name, __name__)` on first use. These count as
    edges from the package to those submodules, as the `if TYPE_CHECKING:` imports that mirror them
    do: a submodule that imported the package's lazy names back would close a real loop (its first
    attribute access, during its own import, would re-enter it). What does *not* count is the implicit
    import of a parent package that every `import runtime.x` performs: Python runs a package's
    __init__ before any submodule, whatever the design, so an edge from each module to its package
    would make every lazy loader look like a cycle. An explicit `from runtime import X` (or
    `from . import X` where X is not a submodule) is an edge to the package, and counts.
    """
    if "import_module" not in ast.unparse(tree):
        return []
    found = []
    for node in tree.body:
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and isinstance(node.value, ast.Dict):
            for value in ast.walk(node.value):
                if isinstance(value, ast.Constant) and isinstance(value.value, str) and value.value.startswith("."):
                    level = len(value.value) - len(value.value.lstrip("."))
                    target = _resolve_base(module, is_package, level, value.value[level:] or None)
                    if target in known:
                        found.append((target, value.lineno))
    return found


def import_edges(root: Path = REPO, packages: tuple[str, ...] = PACKAGES) -> list[Edge]:
    """Every import from one module of the packages to another, each with its place."""
    files = module_files(root, packages)
    known = set(files)
    edges = []
    for module, path in files.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = _context(tree)
        for node, label in where.items():
            if isinstance(node, ast.Import):
                # `import a.b.c` binds a and needs a.b.c: an edge to the deepest module of ours it names
                targets = [alias.name for alias in node.names]
            else:
                base = _resolve_base(module, is_package, node.level, node.module)
                # `from a import b`: b is the submodule a.b when there is one, else a name defined in a
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            for target in targets:
                while target and target not in known:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    edges.append(Edge(module, target, node.lineno, label))
        for target, line in _lazy_targets(tree, module, is_package, known):
            edges.append(Edge(module, target, line, "lazy loader table"))
    return edges


def cycles(edges: list[Edge]) -> list[list[str]]:
    """Every elementary cycle, each started at its smallest module name (so each is listed once)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.module, set()).add(e.target)
    found: list[list[str]] = []

    def walk(start: str, node: str, path: list[str], on_path: set[str]) -> None:
        for nxt in sorted(graph.get(node, ())):
            if nxt == start:
                found.append([*path, start])
            elif nxt > start and nxt not in on_path and len(found) < MAX_CYCLES_LISTED:
                on_path.add(nxt)
                walk(start, nxt, [*path, nxt], on_path)
                on_path.discard(nxt)

    for start in sorted(graph):
        walk(start, start, [start], {start})
    return sorted(found, key=lambda c: (len(c), c))


def describe(cycle: list[str], edges: list[Edge]) -> str:
    """`a -> b -> a`, then where each step's import stands."""
    files, places = module_files(), []
    for a, b in zip(cycle, cycle[1:]):
        e = min((e for e in edges if e.module == a and e.target == b), key=lambda e: e.line)
        places.append(f"      {a} -> {b}: {files[a].relative_to(REPO)}:{e.line} ({e.where})")
    return "  " + " -> ".join(cycle) + "\n" + "\n".join(places)


def test_the_graph_sees_every_kind_of_import(tmp_path):
    """The parser on a made-up package, so an empty or half-read graph cannot pass the cycle test."""
    files = {
        "pkg/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .top import Top\n_LAZY = {'Lazy': '.lazy'}\n"
        "def __getattr__(name):\n    import importlib\n    return importlib.import_module(_LAZY[name], __name__)\n",
        "pkg/top.py": "import os\nfrom .sub import leaf\nfrom . import plain\nclass Top: ...\n",
        "pkg/plain.py": "def f():\n    from pkg.sub.leaf import g\n",
        "pkg/lazy.py": "from pkg import Top\n",
        "pkg/sub/__init__.py": "",
        "pkg/sub/leaf.py": "import pkg.plain\nfrom ..plain import f\ndef g(): ...\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = import_edges(tmp_path, ("pkg",))
    assert {(e.module, e.target, e.where) for e in edges} == {
        ("pkg", "pkg.top", "under TYPE_CHECKING"),
        ("pkg", "pkg.lazy", "lazy loader table"),
        ("pkg.top", "pkg.sub.leaf", "module level"),
        ("pkg.top", "pkg.plain", "module level"),
        ("pkg.plain", "pkg.sub.leaf", "in f()"),
        ("pkg.lazy", "pkg", "module level"),  # a name from the package itself: an edge to the package
        ("pkg.sub.leaf", "pkg.plain", "module level"),
    }
    assert cycles(edges) == [["pkg", "pkg.lazy", "pkg"], ["pkg.plain", "pkg.sub.leaf", "pkg.plain"]]
    # and the real tree is read: both packages, and export's imports of runtime
    real = import_edges()
    assert len(module_files()) > 20 and any(e.module.startswith("export.") and e.target.startswith("runtime.") for e in real)


def test_resolving_relative_imports():
    assert _resolve_base("runtime.backends.onnxruntime", False, 2, "engine") == "runtime.engine"
    assert _resolve_base("runtime.backends", True, 1, "tensorrt") == "runtime.backends.tensorrt"
    assert _resolve_base("runtime.pipeline", False, 1, None) == "runtime"
    assert _resolve_base("runtime", True, 1, "pipeline") == "runtime.pipeline"
    assert cycles([Edge("a", "b", 1, ""), Edge("b", "c", 1, ""), Edge("c", "a", 1, ""), Edge("c", "b", 1, "")]) == [
        ["b", "c", "b"],
        ["a", "b", "c", "a"],
    ]


def test_no_import_cycles_in_runtime_and_export():
    edges = import_edges()
    found = cycles(edges)
    listed = "\n".join(describe(c, edges) for c in found)
    more = f"\n  (listing stopped at {MAX_CYCLES_LISTED})" if len(found) >= MAX_CYCLES_LISTED else ""
    assert not found, (
        f"{len(found)} import cycle(s) in runtime/ and export/ (imports inside functions and under TYPE_CHECKING count):\n"
        f"{listed}{more}\nBreak each by moving what both sides need into a module that neither imports back."
    )


def test_import_runtime_loads_no_backend_and_no_torch():
    """`import runtime` must not pull in a backend or torch (nor numpy: it loads on first use), and
    neither may the package's lazy names: backends load when a bundle is opened."""
    heavy = ("torch", "onnxruntime", "tensorrt", "cuda", "diffusers", "transformers")
    for statement, also in (("import runtime", ("numpy",)), ("from runtime import Pipeline, BundleError, load_manifest", ())):
        probe = (
            f"import sys; {statement}; "
            f"print(sorted(m for m in sys.modules if m.split('.')[0] in {heavy + also!r} or m.startswith('runtime.backends')))"
        )
        done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.strip() == "[]", f"`{statement}` imported {done.stdout.strip()}"


# Bottom up: the runtime; export and serving on top of it (peers: neither imports the other); the samples (which
# may build a bundle); then the reference model's tooling and the benchmarks. Nothing imports upward or sideways.
LAYERS = {"runtime": 0, "export": 1, "serving": 1, "samples": 2, "reference": 3, "benchmarks": 4}


def layer_violations(edges: list[Edge]) -> list[Edge]:
    """Every import from one package into another that is not strictly below it."""
    top = {e.module.split(".")[0] for e in edges} | {e.target.split(".")[0] for e in edges}
    rank = {p: LAYERS[p] for p in top}
    return [
        e for e in edges
        if (a := e.module.split(".")[0]) != (b := e.target.split(".")[0]) and rank[b] >= rank[a]
    ]  # fmt: skip


def test_layer_check_sees_upward_and_sideways_imports():
    edges = [
        Edge("runtime.session", "runtime.bundle", 1, ""),  # within a package: fine
        Edge("export.build", "runtime.bundle", 1, ""),  # down: fine
        Edge("runtime.cli", "export.build", 1, "in main()"),  # up
        Edge("export.build", "serving.repository", 1, ""),  # sideways
        Edge("benchmarks.sd15", "reference.dataset", 1, ""),  # down: fine
    ]
    found = [(e.module, e.target) for e in layer_violations(edges)]
    assert found == [("runtime.cli", "export.build"), ("export.build", "serving.repository")]


def test_layers_runtime_below_export_serving_and_samples():
    """runtime/ imports nothing of export/, serving/, samples/, reference/ or benchmarks/; export/ and serving/ neither
    import each other nor anything above; samples/ import no reference/ or benchmarks/ code (each import counts,
    wherever it stands: in a function, under TYPE_CHECKING)."""
    edges = import_edges(REPO, tuple(LAYERS))
    assert {e.module.split(".")[0] for e in edges} == set(LAYERS)  # every layer was read
    bad = layer_violations(edges)
    files = module_files(REPO, tuple(LAYERS))
    listed = "\n".join(f"  {e.module} -> {e.target}: {files[e.module].relative_to(REPO)}:{e.line} ({e.where})" for e in bad)
    assert not bad, f"{len(bad)} import(s) against the layer order {LAYERS}:\n{listed}"
