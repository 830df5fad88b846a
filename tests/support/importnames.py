"""The checkout laid out under its import names, for static tools that cannot follow setuptools package-dir.

The folders map to loraplane.* through ``[tool.setuptools] package-dir`` (crds/ is loraplane.crds, ...);
mypy and import-linter look for ``loraplane/crds/`` on a path. ``import_tree(dest)`` lays that tree
(symlinks to the folders, or copies when a test must add a module without touching the checkout) from
the same package-dir table, and returns the directory to put first on the tool's path.
"""

from __future__ import annotations

import shutil
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def package_dirs() -> dict[str, Path]:
    """Import name -> folder, as pyproject.toml maps them."""
    table = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    return {name: REPO / folder for name, folder in table.items()}


def import_tree(dest: Path, *, copy: bool = False) -> Path:
    """dest/loraplane/{crds,operator,...} and loraplane's own modules; returns dest."""
    top = dest / "loraplane"
    top.mkdir(parents=True)
    for name, folder in package_dirs().items():
        if name == "loraplane":
            for module in folder.glob("*.py"):
                _place(module, top / module.name, copy)
        else:
            _place(folder, top / name.removeprefix("loraplane."), copy)
    return dest


def _place(src: Path, dst: Path, copy: bool) -> None:
    if not copy:
        dst.symlink_to(src)
    elif src.is_dir():
        shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.yaml", "data"))
    else:
        shutil.copy(src, dst)
