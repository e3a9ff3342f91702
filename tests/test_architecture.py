"""The package keeps the shape docs/architecture.md describes: no import cycle, modules of one size, every
module on the map."""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "icthp"


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        mods[name.removesuffix(".__init__")] = path
    return mods


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", "")) == "TYPE_CHECKING":
            skip |= {id(sub) for sub in ast.walk(node)}
    return skip


def import_graph() -> dict[str, set[str]]:
    """Module -> the icthp modules it imports (module level or inside functions; not under TYPE_CHECKING).

    ``from . import x`` of a submodule is an edge to the submodule only; a submodule import also imports its
    parent packages (their ``__init__`` runs first).
    """
    mods = _modules()
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_nodes(tree)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - max(node.level - 1, 0)] if node.level else []
                target = ".".join(base + ([node.module] if node.module else [])) if node.level else (node.module or "")
                subs = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in mods]
                targets = subs if subs and len(subs) == len(node.names) else [target, *subs]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                if t in mods and t != name:
                    graph[name].add(t)  # what is imported (a module's own package included: a real cycle)
                parts = t.split(".")
                for k in range(2, len(parts)):
                    dep = ".".join(parts[:k])  # the parent packages it implies, but not one's own
                    if dep in mods and dep != name and not name.startswith(dep + "."):
                        graph[name].add(dep)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(10_000, limit))  # the graph's depth; restored: other tests rely on the default
    try:
        for v in list(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return found


def test_no_import_cycle():
    graph = import_graph()
    assert graph["icthp.cli.score"], "the import graph is empty: the parser lost its way"
    assert not cycles(graph), cycles(graph)


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_registry_and_scores_import_no_scorer():
    # The table of models and the score formulas sit below every scorer, so anything may use them.
    graph = import_graph()
    for module in ("icthp.registry", "icthp.scores", "icthp.choices"):
        assert not {m for m in graph[module] if m.startswith(("icthp.scoring", "icthp.baselines"))}, module


def test_modules_stay_small():
    # ~600 lines is where a module gets split (docs/architecture.md); ImageReward's BLIP is the one large file.
    sizes = {name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in _modules().items()}
    large = {n: s for n, s in sizes.items() if s > 700 and n != "icthp.baselines.imagereward"}
    assert not large, large


def test_every_module_is_on_the_map():
    # Each module is named in docs/architecture.md: a top-level one by its file (`files.py`), one in a
    # folder by the folder's row and its file (`bench/` ... `compute.py`).
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = []
    for path in _modules().values():
        parts = path.relative_to(PACKAGE).parts
        if parts[-1] == "__init__.py" or parts[0] == "architectures":
            continue
        named = parts[-1] in text if len(parts) == 1 else f"`{parts[0]}/" in text and parts[-1].removesuffix(".py") in text
        if not named:
            missing.append("/".join(parts))
    assert not missing, f"modules missing from docs/architecture.md: {missing}"
