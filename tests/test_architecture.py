"""The design's "never" arrows, checked on the source: which package may import which.

- the API (crds/) imports no controller, worker or local server;
- the operator and the worker never import each other;
- localkube imports nothing of loraplane (it stands in for kube-apiserver);
- the engines (worker/engine/, worker/vllm/) import no HTTP, no Kubernetes and no control path:
  the worker wires them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"crds": "loraplane.crds", "operator": "loraplane.operator", "worker": "loraplane.worker"}
FOLDERS |= {"localkube": "loraplane.localkube", "loraplane": "loraplane"}

HTTP_AND_KUBE = ("aiohttp", "fastapi", "starlette", "uvicorn", "kubernetes", "kopf")
CONTROL_PATH = tuple(
    f"loraplane.worker.{m}"
    for m in ("api", "cache", "controller", "main", "registry", "report", "serve", "sources", "watch")
) + ("loraplane.crds.kube", "loraplane.operator")

# (folder or module prefix, forbidden import prefixes)
CONTRACTS = [
    ("loraplane.crds", ("loraplane.operator", "loraplane.worker", "loraplane.localkube", "loraplane.cli")),
    ("loraplane.operator", ("loraplane.worker", "loraplane.localkube")),
    ("loraplane.worker", ("loraplane.operator", "loraplane.localkube")),
    ("loraplane.localkube", ("loraplane.crds", "loraplane.operator", "loraplane.worker", "loraplane.cli")),
    ("loraplane.worker.engine", HTTP_AND_KUBE + CONTROL_PATH),
    ("loraplane.worker.vllm", HTTP_AND_KUBE + CONTROL_PATH),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO)
    parts = [FOLDERS[rel.parts[0]], *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path, module: str) -> Iterator[tuple[int, str]]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import module` imports pkg.module when it is one
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"


def _sources() -> Iterator[tuple[Path, str]]:
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            yield path, _module_name(path)


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


@pytest.mark.parametrize(("owner", "forbidden"), CONTRACTS, ids=[c[0] for c in CONTRACTS])
def test_import_contract(owner: str, forbidden: tuple[str, ...]) -> None:
    broken = [
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path, module in _sources()
        if _within(module, owner)
        for line, name in _imports(path, module)
        if any(_within(name, f) for f in forbidden)
    ]
    assert not broken, "\n".join(broken)


def test_the_checker_sees_relative_imports() -> None:
    # Guard against a checker that passes by seeing nothing: resolve a known relative import.
    path = REPO / "worker" / "engine" / "runner.py"
    names = {name for _, name in _imports(path, _module_name(path))}
    assert any(_within(n, "loraplane.worker.engine") for n in names), sorted(names)
