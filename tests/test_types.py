"""mypy over the API, the operator and the worker's control path, in CI.

The folders map to loraplane.* through setuptools package-dir, which static tools cannot follow, so the
test lays a tree of symlinks with the import names (loraplane/crds -> crds/, ...) and checks it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The engines are checked by their numerical tests; the control path, the API and the operator here.
TARGETS = ["loraplane.crds", "loraplane.operator", "loraplane.worker"]
EXCLUDE = r"/worker/(engine|vllm)/"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_mypy_is_clean(tmp_path: Path) -> None:
    tree = tmp_path / "src" / "loraplane"
    tree.mkdir(parents=True)
    for folder in ("crds", "operator", "worker", "localkube"):
        (tree / folder).symlink_to(REPO / folder)
    for module in (REPO / "loraplane").glob("*.py"):
        (tree / module.name).symlink_to(module)
    cmd = [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"), "--exclude", EXCLUDE]
    cmd += [arg for target in TARGETS for arg in ("-p", target)]
    cmd += ["--cache-dir", str(tmp_path / "cache")]
    out = subprocess.run(cmd, cwd=tmp_path / "src", capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
