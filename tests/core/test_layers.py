"""Import layering of the project, checked statically with ``ast`` (the project is never imported).

Source folders and their import names come from ``[tool.setuptools.package-dir]`` in pyproject.toml;
every ``*.py`` below a mapped folder is a project module (``__init__.py`` is the package itself).
Every import counts, at module level or inside a function, except under ``if TYPE_CHECKING:``.
Only edges between project modules count. To place a new module, add its prefix to ``LAYERS``.
Dynamic imports (``importlib.import_module(f"...")``) are invisible to this test.
"""
from __future__ import annotations

import ast
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

# Module-name prefix -> layer, bottom (0) to top. A prefix matches the module itself and anything
# below it (``vtr.cli`` matches ``vtr.cli`` and ``vtr.cli.zoo``, not ``vtr.cli_zoo``); the longest wins.
LAYERS: dict[str, int] = {
    "vtr._version": 0,     # __version__ alone (the facade re-exports it; the CLI's --version reads it)
    "vtr._data": 0,        # where the top-level data folders (kernels/ sources, model_zoo/ entries) are found
    "vtr.kernels": 0,      # CuPy kernels and their torch fallbacks
    "vtr.core": 1,         # token state, signals, reduction plan/settings, per-call run and report
    "vtr.reducers": 2,
    "vtr.budget": 3,       # cost model, schedule solver
    "vtr.adapters": 4,
    "vtr.adaptive": 4,     # DyT, SmartTrim: modules swapped into timm blocks (beside the adapters; the api imports them)
    "vtr.compression": 4,  # TokenPacker, adaptive granularity: modules a VLM gains (they use the VLM wing's prompt code)
    "vtr.api": 5,
    "vtr.training": 5,     # disabled, trainable, decisions: switches for fine-tuning a patched model
    "vtr.losses": 5,       # distillation, keep-ratio and CLIP losses
    "vtr.tools": 6,        # profile, bench, latency, visualize, calibrate, fidelity, zoo, clip, models, saving
    "vtr.model_zoo": 5,    # zoo entries and presets, which vtr.patch(preset=...) reads
    "vtr.cli": 7,
}
FACADE = "vtr"  # vtr/__init__.py may import anything; nothing else may import it

# (subject prefix, forbidden prefix): no module under the subject imports a module under the forbidden
# prefix (the subject itself excepted, so a package may still import its own submodules).
FORBIDDEN: list[tuple[str, str]] = [
    ("vtr.budget.cost", "vtr.reducers"),
    ("vtr.reducers", "vtr.adapters"),
    ("vtr.adapters.llava.common", "vtr.adapters.llava"),   # shared helpers import no sibling
    ("vtr.adapters.qwen_vl.common", "vtr.adapters.qwen_vl"),
    ("vtr.adapters.vlm", "vtr.adapters.llava"),             # what every VLM family shares imports no family
    ("vtr.adapters.vlm", "vtr.adapters.qwen_vl"),
]

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str
    file: str
    line: int

    def __str__(self) -> str:
        return f"{self.src} -> {self.dst}  ({self.file}:{self.line})"


def under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def layer_of(module: str) -> int | None:
    matches = [p for p in LAYERS if under(module, p)]
    return LAYERS[max(matches, key=len)] if matches else None


def discover(root: Path) -> dict[str, Path]:
    """Import name -> file for every ``*.py`` under the folders of package-dir (deepest mapping wins)."""
    package_dir = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    folders = {(root / folder).resolve(): name for name, folder in package_dir.items() if name}
    missing = [str(f) for f in folders if not f.is_dir()]
    assert not missing, f"pyproject.toml package-dir names folders that do not exist: {missing}"
    modules: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(folder.rglob("*.py")):
            base = max((f for f in folders if path.is_relative_to(f)), key=lambda f: len(f.parts))
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join([folders[base], *parts])] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, is_package: bool, source: str) -> list[tuple[tuple[str, ...], int]]:
    """(candidate absolute names, line) for every import in ``source``, outside ``if TYPE_CHECKING:``.
    ``from pkg import name`` gives ``(pkg.name, pkg)``: the first that is a project module is the target."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[tuple[str, ...], int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children = node.orelse   # skip the body, keep the else branch
        else:
            children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            found.extend(((alias.name,), node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            stem = node.module or ""
            if node.level:   # relative: level 1 is this package, each further level one up
                parts = package.split(".")
                stem = ".".join(parts[: max(len(parts) - node.level + 1, 0)] + ([stem] if stem else []))
            found.extend(((f"{stem}.{alias.name}", stem) if alias.name != "*" else (stem,), node.lineno)
                         for alias in node.names)
        for child in children:
            visit(child)

    visit(ast.parse(source))
    return found


def resolve(name: str, modules) -> str | None:
    """The project module ``name`` denotes: itself, else its longest dotted prefix that is a module."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def edges_of(modules: dict[str, Path], root: Path = ROOT) -> list[Edge]:
    edges: set[Edge] = set()
    for module, path in modules.items():
        rel = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        for candidates, line in imports_of(module, path.name == "__init__.py", path.read_text()):
            target = next((c for c in candidates if c in modules), None) or resolve(candidates[-1], modules)
            if target is not None and target != module:
                edges.add(Edge(module, target, rel, line))
    return sorted(edges, key=lambda e: (e.src, e.dst, e.line))


def tangles(graph: dict[str, set[str]]) -> list[list[list[str]]]:
    """Per strongly connected component with a cycle (Tarjan), the shortest cycle ``[a, ..., a]``
    through each of its members, each cycle once (rotated to start at its smallest name)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for start in sorted(set(graph) | {d for ds in graph.values() for d in ds}):
        if start in index:
            continue
        index[start] = low[start] = len(index)
        stack.append(start), on_stack.add(start)
        work = [(start, iter(sorted(graph.get(start, ()))))]
        while work:   # iterative depth-first search
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while not component or member != node:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                    components.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child), on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    found = []
    for component in sorted(components, key=min):
        cycles: list[list[str]] = []
        for first in sorted(component):
            parent: dict[str, str] = {}
            queue = deque([first])
            while queue:   # breadth-first inside the component: the shortest way back to `first`
                node = queue.popleft()
                if first in graph.get(node, ()):
                    path = [node]
                    while path[-1] != first:
                        path.append(parent[path[-1]])
                    cycle = [*reversed(path), first][:-1]
                    at = cycle.index(min(cycle))
                    cycle = cycle[at:] + cycle[:at] + [min(cycle)]
                    if cycle not in cycles:
                        cycles.append(cycle)
                    break
                for child in sorted(graph.get(node, ())):
                    if child in component and child not in parent and child != first:
                        parent[child] = node
                        queue.append(child)
        if cycles:
            found.append(sorted(cycles, key=lambda c: (len(c), c)))
    return found


@pytest.fixture(scope="module")
def project():
    modules = discover(ROOT)
    assert FACADE in modules and len(modules) >= 10, f"module discovery found too little: {sorted(modules)}"
    return modules, edges_of(modules)


def _listing(lines) -> str:
    return "\n  " + "\n  ".join(map(str, lines))


def test_graph_logic_on_synthetic_graphs(tmp_path):
    """Cycle search finds cycles iff they exist; discovery and import resolution work on a tiny fake project."""
    assert tangles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}) == [[["a", "b", "c", "a"]]]
    assert tangles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []
    assert tangles({"a": {"a"}, "b": {"c"}, "c": {"b"}}) == [[["a", "a"]], [["b", "c", "b"]]]
    assert tangles({"a": {"b", "c"}, "b": {"a"}, "c": {"d"}, "d": {"a"}}) == [[["a", "b", "a"], ["a", "c", "d", "a"]]]
    (tmp_path / "pyproject.toml").write_text('[tool.setuptools.package-dir]\n"p" = "p"\n"p.ext" = "ext"\n')
    for name, text in {
        "p/__init__.py": "from . import sub\nfrom .sub.leaf import thing\n",
        "p/sub/__init__.py": "",
        "p/sub/leaf.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p import a\n"
                         "def f():\n    from ..a import helper\n    import p.sub\n",
        "p/a.py": "import os\nfrom p import sub, thing\n",
        "ext/__init__.py": "", "ext/deep/x.py": "from ...ext import deep\nfrom p.a import y\n",
    }.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    modules = discover(tmp_path)
    assert sorted(modules) == ["p", "p.a", "p.ext", "p.ext.deep.x", "p.sub", "p.sub.leaf"]
    got = {(e.src, e.dst, e.line) for e in edges_of(modules, tmp_path)}
    assert got == {("p", "p.sub", 1), ("p", "p.sub.leaf", 2), ("p.sub.leaf", "p.a", 5), ("p.sub.leaf", "p.sub", 6),
                   ("p.a", "p.sub", 2), ("p.a", "p", 2), ("p.ext.deep.x", "p.ext", 1), ("p.ext.deep.x", "p.a", 2)}


def test_no_import_cycles(project):
    """No cycle among project modules (the facade excluded); shows each tangle and its shortest cycles."""
    modules, edges = project
    graph: dict[str, set[str]] = {m: set() for m in modules if m != FACADE}
    where = {}
    for e in edges:
        if FACADE not in (e.src, e.dst):
            graph[e.src].add(e.dst)
            where.setdefault((e.src, e.dst), e)
    found = tangles(graph)
    report = "\n".join(
        f"tangle of {len({m for c in cycles for m in c})} modules:\n"
        + "\n".join(f"  cycle: {' -> '.join(c)}" + _listing(where[a, b] for a, b in zip(c, c[1:])).replace("\n", "\n  ")
                    for c in cycles) for cycles in found)
    assert not found, f"{len(found)} import tangle(s) (strongly connected groups):\n{report}"


def test_imports_go_down_the_layers(project):
    """Every import goes to the same or a lower layer."""
    _, edges = project
    up = [f"{e}  layer {layer_of(e.src)} -> {layer_of(e.dst)}" for e in edges if e.src != FACADE
          and None not in (layer_of(e.src), layer_of(e.dst)) and layer_of(e.dst) > layer_of(e.src)]
    assert not up, f"{len(up)} import(s) go up the layers:{_listing(up)}"


def test_nothing_imports_the_facade(project):
    """No module but the facade itself imports the facade ``vtr`` (import vtr / from vtr import <non-module>)."""
    _, edges = project
    bad = [e for e in edges if e.dst == FACADE]
    assert not bad, f"{len(bad)} import(s) of the facade `{FACADE}`:{_listing(bad)}"


def test_forbidden_imports(project):
    """The extra rules in FORBIDDEN hold, and each rule's subject exists (no stale rule)."""
    modules, edges = project
    problems = [f"rule subject {s} matches no module (stale rule, or layout not migrated yet)"
                for s, _ in FORBIDDEN if not any(under(m, s) for m in modules)]
    problems += [f"{e}  breaks: {s}* imports nothing from {f}*" for s, f in FORBIDDEN for e in edges
                 if under(e.src, s) and under(e.dst, f) and not under(e.dst, s)]
    assert not problems, f"{len(problems)} problem(s) with the extra import rules:{_listing(problems)}"


def test_every_module_has_a_layer(project):
    """Every project module (but the facade) is placed in LAYERS, so new files must be placed."""
    modules, _ = project
    unknown = [f"{m}  ({p.relative_to(ROOT)})" for m, p in sorted(modules.items())
               if m != FACADE and layer_of(m) is None]
    assert not unknown, f"{len(unknown)} module(s) with no layer, add them to LAYERS:{_listing(unknown)}"
