"""What a build depends on, checked without building (tests/images builds and starts the images with
`make images`): every COPY source exists and is not hidden by .dockerignore, the files the Dockerfiles
COPY are enough to build the wheel, and each image's entry point starts (--help) from that wheel."""

from __future__ import annotations

import fnmatch
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile"))
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def _copy_sources(path: Path) -> list[str]:
    """Sources of COPY/ADD instructions that read the build context (not --from= another stage)."""
    sources = []
    for word, args in _instructions(path):
        if word not in ("COPY", "ADD"):
            continue
        parts = [p for p in args.split() if not p.startswith("--chown") and not p.startswith("--chmod")]
        if any(p.startswith("--from") for p in parts):
            continue
        sources.extend(parts[:-1])
    return sources


def _dockerignored(rel: str) -> bool:
    patterns = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    rel = rel.rstrip("/")
    return any(fnmatch.fnmatch(rel, p) or rel.startswith(p.rstrip("/") + "/") for p in patterns)


def _entrypoint(path: Path) -> str:
    (args,) = [a for w, a in _instructions(path) if w == "ENTRYPOINT"]
    return re.findall(r'"([^"]+)"', args)[0]


def test_four_dockerfiles() -> None:
    assert [p.name for p in DOCKERFILES] == [
        "operator.Dockerfile",
        "worker-cpu.Dockerfile",
        "worker-cuda.Dockerfile",
        "worker-vllm.Dockerfile",
    ]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_are_in_the_context(dockerfile: Path) -> None:
    sources = _copy_sources(dockerfile)
    assert "pyproject.toml" in sources
    for src in sources:
        assert (REPO / src).exists(), f"{dockerfile.name}: COPY {src} but {src} is not in the repository"
        assert not _dockerignored(src), f"{dockerfile.name}: COPY {src} but .dockerignore excludes it"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_images_are_multistage_and_non_root(dockerfile: Path) -> None:
    instructions = _instructions(dockerfile)
    stages = [a for w, a in instructions if w == "FROM"]
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"
    final = max(i for i, (w, _) in enumerate(instructions) if w == "FROM")
    users = [a for w, a in instructions[final:] if w == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), "numeric non-root USER uid:gid"
    assert _entrypoint(dockerfile) in SCRIPTS
    runtime_copies = [a for w, a in instructions[final:] if w == "COPY"]
    assert all("--from=" in a for a in runtime_copies), "the runtime stage copies only built artifacts"
    text = dockerfile.read_text()
    if "vllm" in dockerfile.name:  # torch, CUDA and vLLM as one named vLLM release ships them
        assert re.search(r"ARG VLLM_IMAGE=vllm/vllm-openai:v\d+\.\d+\.\d+$", text, re.MULTILINE)
    elif "worker" in dockerfile.name:
        assert "torch==${TORCH_VERSION}" in text and "TORCH_VERSION=2.13.0" in text
    if "cpu" in dockerfile.name:
        assert "--index-url https://download.pytorch.org/whl/cpu" in text
    if "cuda" in dockerfile.name:
        assert re.search(r"ARG CUDA_IMAGE=nvidia/cuda:[\d.]+-runtime-", text)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from exactly what the Dockerfiles COPY, installed into a venv over the shared one."""
    tmp = tmp_path_factory.mktemp("wheel")
    context = tmp / "context"
    context.mkdir()
    for src in sorted({s for d in DOCKERFILES for s in _copy_sources(d)}):
        target = context / src
        if (REPO / src).is_dir():
            shutil.copytree(REPO / src, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / src, target)
    dist = tmp / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(context)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, f"wheel build failed:\n{build.stdout[-3000:]}\n{build.stderr[-3000:]}"
    (wheel,) = dist.glob("loraplane-*.whl")
    venv = tmp / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120
    )
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stderr
    return venv


def _run(venv: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # Outside the repository, without PYTHONPATH: only the installed wheel can provide loraplane.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}:{env.get('PATH', '')}"
    return subprocess.run(list(args), capture_output=True, text=True, cwd=venv, env=env, timeout=120)


def test_wheel_is_what_gets_imported(wheel_venv: Path) -> None:
    proc = _run(
        wheel_venv,
        str(wheel_venv / "bin" / "python"),
        "-c",
        "import loraplane.crds; print(loraplane.crds.__file__)",
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith(str(wheel_venv)), proc.stdout
    crds = _run(
        wheel_venv,
        str(wheel_venv / "bin" / "python"),
        "-c",
        "import importlib.resources as r; print(sorted(p.name for p in r.files('loraplane.crds').iterdir()))",
    )
    assert "loraplane.io_loraadapters.yaml" in crds.stdout, "CRD YAML must ship in the wheel"


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_entry_points_start_from_the_wheel(wheel_venv: Path, script: str) -> None:
    exe = wheel_venv / "bin" / script
    assert exe.exists(), f"the wheel installs no {script} script"
    proc = _run(wheel_venv, str(exe), "--help")
    assert proc.returncode == 0, f"{script} --help failed:\n{proc.stderr[-3000:]}"
    assert "usage:" in proc.stdout.lower()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_every_image_entry_point_is_a_wheel_script(dockerfile: Path, wheel_venv: Path) -> None:
    assert (wheel_venv / "bin" / _entrypoint(dockerfile)).exists()


def test_chart_default_images_are_the_ones_built_here() -> None:
    import yaml

    values = yaml.safe_load((REPO / "charts" / "loraplane" / "values.yaml").read_text())
    built = {p.name.removesuffix(".Dockerfile") for p in DOCKERFILES}
    for repository in (values["operator"]["image"]["repository"], values["worker"]["image"]["repository"]):
        name = repository.rsplit("/", 1)[-1]
        assert name.removeprefix("loraplane-") in built, f"{repository}: no docker/*.Dockerfile builds it"
    readme = (REPO / "docker" / "README.md").read_text()
    for dockerfile in DOCKERFILES:
        assert f"-f docker/{dockerfile.name}" in readme, (
            f"docker/README.md has no build command for {dockerfile.name}"
        )


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_deploy_docs_name_the_runtime_base(dockerfile: Path) -> None:
    """docs/deploy.md names the image each Dockerfile's final stage is built FROM (its ARG default)."""
    text = dockerfile.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", text, re.MULTILINE))
    base = re.findall(r"^FROM (\S+)", text, re.MULTILINE)[-1]
    base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], base)
    row = next(
        (
            line
            for line in (REPO / "docs" / "deploy.md").read_text().splitlines()
            if f"`docker/{dockerfile.name}`" in line
        ),
        "",
    )
    assert f"`{base}`" in row, (
        f"docs/deploy.md's image table should name {base} for {dockerfile.name}: {row!r}"
    )
