"""Fixtures for the operator tests: operator processes, adapter helpers and bounded waits.

Every test runs its operators scoped to its own namespace(s), with the ID ledger in that namespace, so
tests never see each other's IDs (a cluster-wide operator would, and rightly refuse a fresh ledger).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.procs import OperatorProc, wait_for

from loraplane.crds.models import ADAPTER_PLURAL, GROUP, VERSION, WORKER_PLURAL


class Adapters:
    """LoRAAdapter and LoRAWorker calls through the official client (a fresh ApiClient per helper)."""

    def __init__(self, kube: Any) -> None:
        from kubernetes import client

        self.api_client = kube.api_client()
        self.co = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    def create(self, ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "LoRAAdapter",
            "metadata": {"name": name},
            "spec": spec,
        }
        return self.co.create_namespaced_custom_object(GROUP, VERSION, ns, ADAPTER_PLURAL, body)

    def get(self, ns: str, name: str) -> dict[str, Any]:
        return self.co.get_namespaced_custom_object(GROUP, VERSION, ns, ADAPTER_PLURAL, name)

    def list(self, ns: str) -> list[dict[str, Any]]:
        return self.co.list_namespaced_custom_object(GROUP, VERSION, ns, ADAPTER_PLURAL)["items"]

    def patch_spec(self, ns: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        return self.co.patch_namespaced_custom_object(
            GROUP, VERSION, ns, ADAPTER_PLURAL, name, {"spec": spec}
        )

    def delete(self, ns: str, name: str) -> None:
        self.co.delete_namespaced_custom_object(GROUP, VERSION, ns, ADAPTER_PLURAL, name)

    def status(self, ns: str, name: str) -> dict[str, Any]:
        return self.get(ns, name).get("status") or {}

    def wait_status(
        self, ns: str, name: str, pred: Callable[[dict[str, Any]], Any], what: str, timeout: float = 20
    ) -> dict[str, Any]:
        return wait_for(
            lambda: (lambda s: s if pred(s) else None)(self.status(ns, name)), timeout, f"{ns}/{name}: {what}"
        )

    def create_worker(
        self,
        ns: str,
        name: str,
        spec: dict[str, Any],
        status: dict[str, Any],
        owner: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """As a worker does: create its LoRAWorker, then write its status."""
        meta: dict[str, Any] = {"name": name}
        if owner:
            meta["ownerReferences"] = [owner]
        body = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRAWorker", "metadata": meta, "spec": spec}
        self.co.create_namespaced_custom_object(GROUP, VERSION, ns, WORKER_PLURAL, body)
        return self.co.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, WORKER_PLURAL, name, {"status": status}
        )

    def close(self) -> None:
        self.api_client.close()


@pytest.fixture(scope="session")
def crds(kube: Any) -> None:
    kube.apply_crds()


@pytest.fixture
def adapters(kube: Any, crds: None) -> Iterator[Adapters]:
    a = Adapters(kube)
    try:
        yield a
    finally:
        a.close()


@pytest.fixture
def operators(
    kube: Any, crds: None, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., OperatorProc]]:
    """A factory: operators(*args) starts one operator process; every one is stopped after the test."""
    procs: list[OperatorProc] = []

    def start(*args: str) -> OperatorProc:
        p = OperatorProc(kube.kubeconfig, None, tmp_path / f"operator-{len(procs)}.log", args=args).start()
        procs.append(p)
        return p

    try:
        yield start
    finally:
        for p in procs:
            p.stop()
        if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
            for p in procs:
                sys.stderr.write(f"---- {p.log_path.name}\n{p.log()[-4000:]}\n")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    rep = yield
    if rep.when == "call":
        item.rep_call = rep  # type: ignore[attr-defined]
    return rep


def scoped(ns: str, *more: str) -> list[str]:
    """Operator flags for a test: watch these namespaces, ledger in the first; short periodic checks."""
    args = ["--ledger-namespace", ns, "--liveness-interval", "0.5"]
    for n in (ns, *more):
        args += ["--namespace", n]
    return args


@pytest.fixture
def scope() -> Callable[..., list[str]]:
    return scoped


@pytest.fixture
def wait() -> Callable[..., Any]:
    return wait_for
