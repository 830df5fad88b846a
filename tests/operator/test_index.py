"""The operator's index of worker reports: a change of one adapter's report reconciles that adapter
only, a heartbeat reconciles none, and the view rebuilt from a LIST after a restart equals the one
built event by event.

The reconciler runs in this process (so the counts are exact) against the API server fixture, fed the
LoRAWorker objects a real WorkerReport writes there.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from prometheus_client import REGISTRY

from loraplane.crds.models import (
    ADAPTER_PLURAL,
    API_VERSION,
    AdapterInfo,
    LoRAWorkerSpec,
    WorkerAdapterReport,
    WorkerCapacity,
)
from loraplane.kube import KubeClient, load_configuration
from loraplane.operator.reconciler import Reconciler
from loraplane.operator.settings import OperatorSettings
from loraplane.worker.report import WorkerReport

BASE = "m"
SPEC = LoRAWorkerSpec(
    baseModel=BASE, capacity=WorkerCapacity(maxLoras=4, maxLoraRank=64, maxCpuLoras=8, cacheBytes=0)
)
INFO = AdapterInfo(rank=8, alpha=16, targetModules=["q_proj"], sizeBytes=1, sha256="c" * 64)


def _reconciles(trigger: str) -> float:
    value = REGISTRY.get_sample_value("loraplane_operator_adapter_reconciles_total", {"trigger": trigger})
    return value or 0.0


class Fleet:
    """N adapters with IDs (through the reconciler) and one worker whose reports the test sets."""

    def __init__(self, kube: Any, namespace: str, n: int) -> None:
        self.kube, self.ns, self.n = kube, namespace, n
        self.settings = OperatorSettings(namespaces=[namespace], ledger_namespace=namespace, metrics_port=0)
        self.reports: dict[int, WorkerAdapterReport] = {}

        self.api = KubeClient(load_configuration(self.kube.kubeconfig))

    async def start(self) -> None:
        self.rec = Reconciler(self.settings, self.api)
        base = f"/apis/{API_VERSION}/namespaces/{self.ns}/{ADAPTER_PLURAL}"
        for i in range(self.n):
            body = {
                "apiVersion": API_VERSION,
                "kind": "LoRAAdapter",
                "metadata": {"name": f"a{i:03d}"},
                "spec": {"baseModel": BASE, "path": f"/models/a{i:03d}"},
            }
            await self.api.request("POST", base, body=body)
        await self.rec.prime()
        for obj in list(self.rec.adapters.values()):
            await self.rec.on_adapter("ADDED", obj)
        self.ids = {o["status"]["id"]: ref for ref, o in self.rec.adapters.items()}
        assert len(self.ids) == self.n
        self.worker = WorkerReport(
            self.api,
            name="w1",
            namespace=self.ns,
            spec=SPEC,
            lookup=self.reports.get,
            known_ids=lambda: self.reports,
        )
        await self.worker.ensure_object()

    def set(self, adapter_id: int, state: str | None, **extra: Any) -> None:
        if state is None:
            self.reports.pop(adapter_id, None)
        else:
            info = INFO if state == "Ready" else None
            ref = self.ids[adapter_id]
            self.reports[adapter_id] = WorkerAdapterReport(
                id=adapter_id, adapter=ref, state=state, info=info, **extra
            )
        self.worker.mark_dirty(adapter_id)

    async def publish(self) -> None:
        """The worker writes; the operator gets the object as its watch would deliver it."""
        await self.worker.write_status()
        obj = await self.api.request("GET", self.worker.path)
        await self.rec.on_worker("MODIFIED", obj)
        await self.rec.idle()  # a worker that came: its adapters are reconciled in the background
        await self.rec.flush()  # what the report window would do a moment later

    async def close(self) -> None:
        if self.rec._flusher is not None:  # it and the Events still use the client
            await self.rec._flusher
        await self.rec.events.drained()
        await self.api.close()

    def phase(self, adapter_id: int) -> str | None:
        return (self.rec.adapters[self.ids[adapter_id]].get("status") or {}).get("phase")


def test_one_report_change_reconciles_one_adapter_and_a_heartbeat_none(kube, crds, namespace):
    fleet = Fleet(kube, namespace, 40)

    async def go() -> None:
        try:
            await fleet.start()
            for i in fleet.ids:
                fleet.set(i, "Ready")
            await fleet.publish()  # a new live worker: every adapter of its base model counts it
            assert {fleet.phase(i) for i in fleet.ids} == {"Ready"}
            one = sorted(fleet.ids)[17]
            before = _reconciles("worker")
            fleet.set(one, "Failed", reason="RankTooLarge", message="rank 128 exceeds maxLoraRank 64")
            await fleet.publish()
            assert _reconciles("worker") - before == 1
            assert fleet.phase(one) == "Failed"
            status = fleet.rec.adapters[fleet.ids[one]]["status"]
            assert status["message"] == (
                f"worker {namespace}/w1: RankTooLarge: rank 128 exceeds maxLoraRank 64"
            )
            before = _reconciles("worker"), _reconciles("tick")
            await fleet.publish()  # nothing changed: a heartbeat
            await fleet.rec.tick()  # the periodic check: the worker is still live
            assert (_reconciles("worker"), _reconciles("tick")) == before
        finally:
            await fleet.close()

    asyncio.run(go())


def test_view_after_a_restart_equals_the_view_built_event_by_event(kube, crds, namespace):
    fleet = Fleet(kube, namespace, 60)
    rng = random.Random(7)
    states = ["Ready", "Failed", "Prefetching", "Validating", None]

    async def go() -> None:
        try:
            await fleet.start()
            for _ in range(12):
                for i in rng.sample(sorted(fleet.ids), 15):
                    state = rng.choice(states)
                    extra = {}
                    if state == "Failed" or (state == "Prefetching" and rng.random() < 0.5):
                        extra = {"reason": rng.choice(["CacheFull", "RankTooLarge"]), "message": f"m{i}"}
                    fleet.set(i, state, **extra)
                await fleet.publish()
            restarted = Reconciler(fleet.settings, fleet.api)
            await restarted.prime()
            ref = f"{namespace}/w1"
            built, listed = fleet.rec.workers[ref], restarted.workers[ref]
            assert built.same_reports(listed)
            assert built.states == {i: _kind(r.state) for i, r in fleet.reports.items()}
            for i, r in fleet.reports.items():
                assert built.report(i)["state"] in (r.state, "Loading")
                if r.reason:
                    assert built.report(i)["reason"] == r.reason  # few failures: every detail fits
            assert restarted._by_id == fleet.rec._by_id
            # And so is every adapter's status, computed from either view.
            for ref_ in fleet.rec.adapters:
                obj = fleet.rec.adapters[ref_]
                assert (await fleet.rec.desired(obj))[0] == (await restarted.desired(obj))[0]
        finally:
            await fleet.close()

    asyncio.run(go())


def _kind(state: str) -> str:
    return state if state in ("Ready", "Failed") else "Loading"
