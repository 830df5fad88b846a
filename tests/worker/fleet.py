"""Helpers for tests that run real worker processes against the API server fixture.

WorkerProc(kube, tmp, ...)           a `loraplane-worker` subprocess (start/stop/kill/restart), its log,
                                     its /metrics; its LoRAWorker object via .report()
adapter_obj(name, path, ...)          a LoRAAdapter manifest
Adapters(kube, namespace)            create/patch/delete LoRAAdapter objects; assign_ids() plays the
                                     operator's ID assignment where a test must not depend on it
wait_for(fn, timeout, what)           poll until fn() is truthy (bounded), returning its value

Import with importlib (tests/ is not a package):
    spec = importlib.util.spec_from_file_location("fleet", Path(__file__).with_name("fleet.py"))
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
GROUP, VERSION = "loraplane.io", "v1alpha1"
BASE_MODEL = "tiny-llama"


def wait_for(fn: Callable[[], T], timeout: float, what: str | Callable[[], str], interval: float = 0.1) -> T:
    """fn() until it returns something truthy; AssertionError naming `what` (and the last value) on timeout.

    `what` may be a callable (e.g. returning a worker's log tail), evaluated only on failure."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {text}; last value: {last!r}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def adapter_obj(
    name: str,
    path: str,
    *,
    base_model: str = BASE_MODEL,
    served_name: str | None = None,
    revision: str | None = None,
    max_length: int | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"baseModel": base_model, "path": path}
    if served_name:
        spec["name"] = served_name
    if revision:
        spec["revision"] = revision
    if max_length:
        spec["longContext"] = {"maxLength": max_length}
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LoRAAdapter",
        "metadata": {"name": name},
        "spec": spec,
    }


class Adapters:
    """LoRAAdapter objects in one namespace, through the official client."""

    def __init__(self, kube: Any, namespace: str) -> None:
        from kubernetes import client

        self.namespace = namespace
        self._api_client = kube.api_client()
        self.api = client.CustomObjectsApi(self._api_client)

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        return self.api.create_namespaced_custom_object(GROUP, VERSION, self.namespace, "loraadapters", obj)

    def get(self, name: str) -> dict[str, Any]:
        return self.api.get_namespaced_custom_object(GROUP, VERSION, self.namespace, "loraadapters", name)

    def patch_spec(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.api.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "loraadapters", name, {"spec": spec}
        )

    def delete(self, name: str) -> None:
        self.api.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, "loraadapters", name)

    def set_status(self, name: str, status: dict[str, Any]) -> dict[str, Any]:
        """Write status as the operator would (tests that must not depend on the operator)."""
        return self.api.patch_namespaced_custom_object_status(
            GROUP, VERSION, self.namespace, "loraadapters", name, {"status": status}
        )

    def assign(self, name: str, adapter_id: int, *, name_available: bool = True) -> dict[str, Any]:
        cond = {
            "type": "NameAvailable",
            "status": "True" if name_available else "False",
            "reason": "NameAvailable" if name_available else "NameTaken",
            "message": "",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }
        from loraplane.crds.models import version_of

        spec = self.get(name)["spec"]
        version = version_of(spec["path"], spec.get("revision"))
        return self.set_status(name, {"id": adapter_id, "version": version, "conditions": [cond]})

    def counts(self, name: str) -> dict[str, int] | None:
        """The operator's aggregate status.workers of one adapter."""
        return (self.get(name).get("status") or {}).get("workers")

    def ids(self) -> dict[str, int]:
        body = self.api.list_namespaced_custom_object(GROUP, VERSION, self.namespace, "loraadapters")
        return {o["metadata"]["name"]: (o.get("status") or {}).get("id") for o in body.get("items") or []}

    def workers(self, namespace: str | None = None) -> list[dict[str, Any]]:
        body = self.api.list_namespaced_custom_object(
            GROUP, VERSION, namespace or self.namespace, "loraworkers"
        )
        return body.get("items") or []

    def close(self) -> None:
        self._api_client.close()


class WorkerProc:
    """One `loraplane-worker` subprocess with its own cache dir (kept across restarts) and log file."""

    def __init__(
        self,
        kubeconfig: str,
        workdir: Path,
        *,
        name: str,
        namespace: str,
        base_dir: Path,
        local_root: Path,
        served_model: str = BASE_MODEL,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name, self.namespace = name, namespace
        self.dir = Path(workdir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = self.dir / "cache"
        self.log_path = self.dir / "worker.log"
        self.port = free_port()
        self.args = [
            sys.executable, "-m", "loraplane.worker.main",
            "--kubeconfig", kubeconfig,
            "--base-model", str(base_dir),
            "--served-model-name", served_model,
            "--cache-dir", str(self.cache_dir),
            "--cache-bytes", str(256 << 20),
            "--local-roots", str(local_root),
            "--worker-name", name,
            "--pod-namespace", namespace,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--heartbeat-seconds", "2",
            "--report-batch-seconds", "0.1",
            "--log-level", "INFO",
            "--mode", "control",  # a config-only model: no weights to serve
            *(extra or []),
        ]  # fmt: skip
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProc:
        assert not self.alive(), f"worker {self.name} is already running"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> dict[str, float]:
        """Samples from /metrics: 'name{labels}' -> value (empty while the server is not up)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def metric(self, key: str) -> float:
        return self.metrics().get(key, 0.0)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(
                f"worker {self.name} did not stop on SIGTERM within {timeout}s:\n{self.log()[-3000:]}"
            ) from None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> WorkerProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


class OperatorProc:
    """`python -m loraplane.operator.main` scoped to one namespace (its ID ledger there too)."""

    def __init__(
        self, kubeconfig: str, namespace: str, log_path: Path, *, heartbeat_window: float = 10
    ) -> None:
        self.args = [
            sys.executable, "-m", "loraplane.operator.main",
            "--kubeconfig", kubeconfig,
            "--metrics-port", "0",
            "--namespace", namespace,
            "--ledger-namespace", namespace,
            "--liveness-interval", "0.5",
            "--heartbeat-window", str(heartbeat_window),
        ]  # fmt: skip
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> OperatorProc:
        with open(self.log_path, "ab") as out:
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, env=env)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def report(adapters: Adapters, worker: str, namespace: str) -> dict[int, dict[str, Any]]:
    """The worker's LoRAWorker status.adapters by ID (empty when it has not reported)."""
    for item in adapters.workers(namespace):
        if item["metadata"]["name"] == worker:
            return {a["id"]: a for a in (item.get("status") or {}).get("adapters") or []}
    return {}


def states(adapters: Adapters, worker: str, namespace: str) -> dict[int, str]:
    return {i: a["state"] for i, a in report(adapters, worker, namespace).items()}
