"""The distribution imports cleanly from a built wheel, and the folder operator/ never shadows the stdlib."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = [
    "loraplane",
    "loraplane.crds.models",
    "loraplane.localkube",
    "loraplane.operator",
    "loraplane.worker",
]


def test_stdlib_operator_is_not_shadowed_from_the_repo_root() -> None:
    # -S: nothing imports the stdlib's operator before the repository root is first on sys.path,
    # as in a fresh virtualenv's `python -m pip` run from the checkout.
    probe = "import operator; print(operator.__file__)"
    out = subprocess.run([sys.executable, "-S", "-c", probe], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).parent != REPO / "operator", out.stdout
    code = "import loraplane.operator.main as m; print(m.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(REPO / "operator" / "main.py")


def test_only_the_mapped_folders_are_importable() -> None:
    # loraplane is a PEP 420 namespace package with no path hack: tests/, docs/ and the repository
    # root are never importable through it.
    code = (
        "import importlib.util as u, loraplane; "
        "print([n for n in ('loraplane.tests', 'loraplane.docs', 'loraplane.loraplane', 'loraplane.charts') "
        "if u.find_spec(n)]); print(getattr(loraplane, '__file__', None))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["[]", "None"], out.stdout


@pytest.mark.slow
def test_wheel_installs_and_imports(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "build",
            "--wheel",
            "--no-isolation",
            "--outdir",
            str(tmp_path / "dist"),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("loraplane-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)
    python = env_dir / "bin" / "python"
    # The wheel goes in with --no-deps; its dependencies come from the test environment's site-packages,
    # added as a plain path (so that environment's editable install of loraplane is not active).
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        check=True,
        capture_output=True,
    )
    code = "; ".join(f"import {p}" for p in PACKAGES) + "; import loraplane.cli, importlib.resources as r; "
    code += "print(loraplane.cli.__file__); print(sorted(p.name for p in r.files('loraplane.crds').iterdir() if p.name.endswith('.yaml')))"
    out = subprocess.run([str(python), "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    first, crds = out.stdout.splitlines()
    assert str(env_dir) in first, f"imported from {first}, not from the wheel"
    assert "loraplane.io_loraadapters.yaml" in crds
