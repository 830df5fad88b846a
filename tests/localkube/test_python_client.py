"""The kubernetes Python client against the API server: CRUD, conflicts, status, watch and 410 Gone."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, watch
from kubernetes.client.rest import ApiException

HERE = Path(__file__).parent
GROUP, VERSION, PLURAL = "demo.example.com", "v1alpha1", "widgets"


@pytest.fixture(scope="module")
def widgets(kube: Any) -> Iterator[None]:
    with kube.removing_crds({"widgets.demo.example.com"}):
        kube.apply_crds([HERE / "recordings" / "crd.yaml"])
        yield


@pytest.fixture
def api(kube: Any, widgets: None) -> Any:
    with kube.api_client() as c:
        yield client.CustomObjectsApi(c)


def widget(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Widget",
        "metadata": {"name": name},
        "spec": {"base": "models/a", **spec},
    }


def test_create_get_replace_conflict(api: Any, namespace: str) -> None:
    created = api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, widget("w1", size=3))
    assert created["metadata"]["generation"] == 1
    rv = created["metadata"]["resourceVersion"]
    created["spec"]["size"] = 4
    replaced = api.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w1", created)
    assert replaced["metadata"]["generation"] == 2
    assert int(replaced["metadata"]["resourceVersion"]) > int(rv)
    stale = dict(created, metadata={**created["metadata"], "resourceVersion": rv})
    with pytest.raises(ApiException) as e:
        api.replace_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w1", stale)
    assert e.value.status == 409
    assert "the object has been modified; please apply your changes to the latest version" in e.value.body
    with pytest.raises(ApiException) as e:
        api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, widget("w1"))
    assert e.value.status == 409 and "AlreadyExists" in e.value.body


def test_patch_status_ignores_spec_and_keeps_generation(api: Any, namespace: str) -> None:
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, widget("w2", size=3))
    out = api.patch_namespaced_custom_object_status(
        GROUP, VERSION, namespace, PLURAL, "w2", {"spec": {"size": 9}, "status": {"id": 7, "phase": "Ready"}}
    )
    assert out["status"] == {"id": 7, "phase": "Ready"}
    assert out["spec"]["size"] == 3 and out["metadata"]["generation"] == 1
    again = api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w2", {"status": {"id": 1}})
    assert again["status"]["id"] == 7
    assert again["metadata"]["resourceVersion"] == out["metadata"]["resourceVersion"]  # a no-op keeps the RV


def test_watch_sees_changes_in_order(api: Any, namespace: str) -> None:
    listed = api.list_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL)
    rv = listed["metadata"]["resourceVersion"]
    seen: list[tuple[str, str]] = []

    def run() -> None:
        w = watch.Watch()
        for ev in w.stream(
            api.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            resource_version=rv,
            timeout_seconds=5,
        ):
            seen.append((ev["type"], ev["object"]["metadata"]["name"]))
            if ev["type"] == "DELETED":
                w.stop()

    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.2)
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, widget("w3"))
    api.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w3", {"spec": {"size": 5}})
    api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "w3")
    t.join(10)
    assert seen == [("ADDED", "w3"), ("MODIFIED", "w3"), ("DELETED", "w3")]


def test_watch_from_too_old_rv_raises_410(api: Any, namespace: str) -> None:
    w = watch.Watch()
    with pytest.raises(ApiException) as e:
        for _ in w.stream(
            api.list_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            resource_version="1",
            timeout_seconds=2,
        ):
            pass
    assert e.value.status == 410


def test_delete_pod_returns_the_pod(kube, namespace: str) -> None:
    """Pods are deleted with the object in the reply (kube-apiserver's ReturnDeletedObject)."""
    from kubernetes import client

    with kube.api_client() as api_client:
        core = client.CoreV1Api(api_client)
        pod = {"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "image": "busybox"}]}}
        core.create_namespaced_pod(namespace, pod)
        deleted = core.delete_namespaced_pod("p", namespace)
        assert isinstance(deleted, client.V1Pod) and deleted.metadata.name == "p"
