"""kopf against the API server: create/update/delete handlers, its finalizer, events, /status, peering."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.rest import ApiException
from support.procs import scaled

HERE = Path(__file__).parent
GROUP, VERSION, PLURAL = "demo.example.com", "v1alpha1", "widgets"
FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + scaled(timeout)
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except ApiException as e:
            last = e
        if last and not isinstance(last, ApiException):
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture(scope="module")
def crds(kube: Any) -> Iterator[None]:
    names = {"widgets.demo.example.com", "kopfpeerings.kopf.dev", "clusterkopfpeerings.kopf.dev"}
    with kube.removing_crds(names):
        kube.apply_crds([HERE / "recordings" / "crd.yaml", HERE / "recordings" / "kopf-peering-crds.yaml"])
        yield


def run_kopf(kube: Any, namespace: str, *extra: str) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KUBECONFIG": kube.kubeconfig}
    cmd = [sys.executable, "-m", "kopf", "run", "-n", namespace, *extra, str(HERE / "kopf_operator.py")]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=str(HERE))


@pytest.fixture
def operator(kube: Any, crds: None, namespace: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = run_kopf(kube, namespace, "--standalone")
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def test_kopf_handles_create_update_delete(kube: Any, operator: Any, namespace: str) -> None:
    with kube.api_client() as c:
        api = client.CustomObjectsApi(c)
        core = client.CoreV1Api(c)
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Widget",
            "metadata": {"name": "w-kopf"},
            "spec": {"base": "models/a", "size": 3},
        }
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)

        def created() -> Any:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w-kopf")
            return obj if (obj.get("status") or {}).get("phase") == "Created" else None

        obj = wait_for("kopf to set status.phase=Created", created)
        assert obj["status"]["id"] == 1000 + sum(map(ord, "w-kopf")) % 1000
        assert FINALIZER in obj["metadata"]["finalizers"]
        events = wait_for(
            "kopf's event",
            lambda: [
                e
                for e in core.list_namespaced_event(
                    namespace, field_selector="involvedObject.name=w-kopf"
                ).items
                if e.reason == "IdAssigned"
            ],
        )
        assert events[0].involved_object.kind == "Widget"

        api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w-kopf", {"spec": {"size": 4}})

        def updated() -> Any:
            obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w-kopf")
            return obj if obj["status"].get("phase") == "Updated" else None

        wait_for("kopf to set status.phase=Updated", updated)
        deleted = api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w-kopf")
        assert deleted["metadata"]["deletionTimestamp"]  # still there: kopf's finalizer holds it

        def gone() -> bool:
            try:
                api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w-kopf")
            except ApiException as e:
                return e.status == 404
            return False

        wait_for("kopf to remove its finalizer", gone)


def test_kopf_peering(kube: Any, crds: None, namespace: str) -> None:
    with kube.api_client() as c:
        api = client.CustomObjectsApi(c)
        peering = {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "default"}}
        api.create_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings", peering)
        proc = run_kopf(kube, namespace)
        try:

            def peers() -> Any:
                obj = api.get_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings", "default")
                return (obj.get("status") or {}) or None

            status = wait_for("kopf to register itself as a peer", peers)
            peer = next(iter(status.values()))
            assert peer["lifetime"] == 10 and "lastseen" in peer
        finally:
            proc.terminate()
            out, _ = proc.communicate(timeout=20)

        def unregistered() -> Any:
            obj = api.get_namespaced_custom_object("kopf.dev", "v1", namespace, "kopfpeerings", "default")
            return not (obj.get("status") or {})

        wait_for("kopf to remove its peer entry on exit", unregistered, timeout=10)
