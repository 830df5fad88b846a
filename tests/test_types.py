"""mypy over the API, the operator and the worker with its engines, in CI.

The folders map to loraplane.* through setuptools package-dir, which static tools cannot follow, so the
test lays a tree of symlinks with the import names (support.importnames) and checks it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support.importnames import REPO, import_tree

TARGETS = ["loraplane.crds", "loraplane.operator", "loraplane.worker"]
MODULES = ["loraplane.errors", "loraplane.kube"]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mypy_is_clean(tmp_path: Path) -> None:
    src = import_tree(tmp_path / "src")
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml")]
    cmd += [arg for target in TARGETS for arg in ("-p", target)]
    cmd += [arg for module in MODULES for arg in ("-m", module)]
    cmd += ["--cache-dir", str(tmp_path / "cache")]
    out = subprocess.run(cmd, cwd=src, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
