"""Import circles in loraplane, for the structure notes (issue 19): `python scripts/import_cycles.py`.

Builds the import graph with grimp (import-linter's graph: function-level imports count) over the
checkout laid out under its import names, and prints each strongly connected group of modules (every
module in a group reaches every other one by imports), plus the pairs that import each other directly.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import grimp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.importnames import import_tree


def groups(graph: grimp.ImportGraph) -> list[list[str]]:
    """Tarjan's strongly connected components of size > 1."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    sys.setrecursionlimit(10_000)

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for n in graph.find_modules_directly_imported_by(m):
            if n not in index:
                visit(n)
                low[m] = min(low[m], low[n])
            elif n in on_stack:
                low[m] = min(low[m], index[n])
        if low[m] == index[m]:
            group = []
            while True:
                n = stack.pop()
                on_stack.discard(n)
                group.append(n)
                if n == m:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for m in sorted(graph.modules):
        if m.startswith("loraplane") and m not in index:
            visit(m)
    return found


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(import_tree(Path(tmp))))
        graph = grimp.build_graph("loraplane", cache_dir=None)
    cycles = groups(graph)
    pairs = sorted(
        {
            tuple(sorted((a, b)))
            for a in graph.modules
            for b in graph.find_modules_directly_imported_by(a)
            if a != b and a in graph.find_modules_directly_imported_by(b)
        }
    )
    print(f"{len(cycles)} import circle(s) (strongly connected groups), {len(pairs)} mutual pair(s)")
    for g in cycles:
        print(f"  circle of {len(g)}: {', '.join(g)}")
    for a, b in pairs:
        print(f"  pair: {a} <-> {b}")


if __name__ == "__main__":
    main()
