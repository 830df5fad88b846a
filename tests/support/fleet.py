"""LoRAAdapter objects and worker reports for tests that run a fleet against the API server fixture.

adapter_obj(name, path, ...)          a LoRAAdapter manifest
Adapters(kube, namespace)            create/patch/delete LoRAAdapter objects; assign() plays the
                                     operator's ID assignment where a test must not depend on it
report(adapters, worker, namespace)  a worker's LoRAWorker status.adapters by ID; states(...) their states

The processes (WorkerProc, OperatorProc) and the bounded wait (wait_for, scaled, free_port) live in
support.procs; they are re-exported here so a fleet test needs one import.
"""

from __future__ import annotations

from typing import Any

from loraplane.crds.models import GROUP, VERSION, LoRAWorkerStatus
from support.procs import BASE_MODEL, OperatorProc, WorkerProc, free_port, scaled, wait_for

__all__ = [
    "BASE_MODEL",
    "GROUP",
    "VERSION",
    "Adapters",
    "OperatorProc",
    "WorkerProc",
    "adapter_obj",
    "free_port",
    "report",
    "scaled",
    "states",
    "wait_for",
]


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
        version = version_of(spec["path"], spec.get("revision"), spec.get("digest"))
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


def report(adapters: Adapters, worker: str, namespace: str) -> dict[int, dict[str, Any]]:
    """The worker's LoRAWorker report by ID: its details where it gives them, else the state from its ID
    sets (Ready, Failed, or Loading); empty when it has not reported."""
    for item in adapters.workers(namespace):
        if item["metadata"]["name"] == worker:
            status = LoRAWorkerStatus.model_validate(item.get("status") or {})
            details = {int(k): d.model_dump(exclude_none=True) for k, d in (status.adapters or {}).items()}
            return {i: details.get(i) or {"state": state} for i, state in status.states().items()}
    return {}


def states(adapters: Adapters, worker: str, namespace: str) -> dict[int, str]:
    return {i: a["state"] for i, a in report(adapters, worker, namespace).items()}
