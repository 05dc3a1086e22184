"""The package's shape: stages import only stages upstream of them, and no module takes
part in an import cycle (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

from support import REPO

PACKAGE = REPO / "exporter" / "bindscope"

# The pipeline, upstream first. A module may import its own stage and any stage above it;
# stages on one rank (collector and diagnose) do not import each other.
RANKS = {
    "__init__": 0,  # the version
    "logs": 0,
    "model": 0,
    "config": 1,
    "discover": 2,
    "netfilter": 3,
    "classify": 4,
    "judge": 5,
    "probe": 6,
    "scan": 7,
    "peers": 7,  # rounds beside the scan: probes other hosts' exporters
    "collector": 8,
    "diagnose": 8,
    "web": 9,
    "daemon": 10,
    "cli": 11,
    "__main__": 12,
}


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> set[str]:
    """Every bindscope module the file imports, wherever the import statement stands."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("bindscope")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("bindscope"):
            assert node.level == 0, f"{path}: relative import"
            for a in node.names:
                # `from bindscope.x import y`: y may be a module of its own
                sub = f"{node.module}.{a.name}"
                found.add(sub if (PACKAGE.parent / sub.replace(".", "/")).exists()
                          or (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists()
                          else node.module)  # fmt: skip
    return found


GRAPH = {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_stage_has_a_rank():
    assert {stage(m) for m in GRAPH} <= set(RANKS), "a new stage needs a place in RANKS"


def test_imports_point_upstream_only():
    wrong = []
    for module, targets in GRAPH.items():
        here = stage(module)
        for target in targets:
            there = stage(target)
            if there == here or there == "__init__":
                continue
            if RANKS[there] >= RANKS[here]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_no_import_cycles():
    # a package's __init__ is imported before any of its modules: count it as an edge too
    edges = {m: {t for t in ts if t in GRAPH and t != m} for m, ts in GRAPH.items()}
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for nxt in sorted(edges[node]):
            cycle = visit(nxt, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    cycles = [c for m in sorted(edges) if (c := visit(m, []))]
    assert cycles == []


def test_the_graph_was_read():
    # a broken walk would pass the tests above vacuously
    assert len(GRAPH) > 30
    assert "bindscope.model" in GRAPH["bindscope.scan"]
