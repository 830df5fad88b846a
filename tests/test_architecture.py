"""The design's "never" arrows, as import-linter contracts (pyproject.toml [tool.importlinter]) run in CI.

The contracts: the layers (entry points > operator | worker, which never import each other > the API >
the Kubernetes client | telemetry > errors | version), the engines and what they share (worker/inference)
import no control path, HTTP layer or Kubernetes API or client, the two engines never import each other,
worker/inference imports neither engine and no torch, the HTTP layer reaches an engine only through the
interface, localkube imports nothing of loraplane, and the control plane imports no local server and no
numeric stack.
import-linter reads the import graph statically, function-level imports and indirect chains included,
over the checkout laid out under its import names (support.importnames).
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from support.importnames import REPO, import_tree

CONTRACTS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
LINT = "import sys; from importlinter.cli import lint_imports_command as c; sys.argv[0] = 'lint-imports'; c()"


def lint_imports(tree: Path) -> subprocess.CompletedProcess[str]:
    # A subprocess with the tree first on its path: in this process `loraplane` is the editable install.
    cmd = [sys.executable, "-c", LINT, str(REPO / "pyproject.toml"), "--no-cache"]
    env = {"PYTHONPATH": str(tree), "PATH": "/usr/bin:/bin", "NO_COLOR": "1", "COLUMNS": "200"}
    return subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=300)


def test_the_import_contracts_are_kept(tmp_path: Path) -> None:
    out = lint_imports(import_tree(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in out.stdout, out.stdout


@pytest.mark.parametrize(
    ("module", "source", "contract"),
    [
        # an engine reaching the watch through a third module: indirect chains count
        (
            "worker/builtin/zz_probe.py",
            "from loraplane.worker import zz_helper\n",
            "The engines and what they share",
        ),
        ("localkube/zz_probe.py", "import loraplane.version\n", "localkube imports nothing"),
        ("worker/zz_probe.py", "def f():\n    import loraplane.operator.allocation\n", "Layers"),
        ("crds/zz_probe.py", "import torch\n", "The control plane"),
        ("worker/inference/zz_probe.py", "import torch\n", "What the engines share"),
        (
            "worker/vllm/zz_probe.py",
            "import loraplane.worker.builtin.heap\n",
            "The two engines are independent",
        ),
        ("worker/api/zz_probe.py", "import loraplane.worker.builtin.heap\n", "The HTTP layer"),
    ],
)
def test_a_broken_contract_is_reported(tmp_path: Path, module: str, source: str, contract: str) -> None:
    """The check can fail: one forbidden import added to a copy of the tree breaks the named contract."""
    tree = import_tree(tmp_path, copy=True)
    (tree / "loraplane" / "worker" / "zz_helper.py").write_text("import loraplane.worker.watch\n")
    (tree / "loraplane" / module).write_text(source)
    out = lint_imports(tree)
    assert out.returncode == 1, out.stdout + out.stderr
    broken = [line for line in out.stdout.splitlines() if line.endswith("BROKEN")]
    assert len(broken) == 1 and broken[0].startswith(contract), out.stdout
    assert "zz_probe" in out.stdout, out.stdout
