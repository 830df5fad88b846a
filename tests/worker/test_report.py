"""The LoRAWorker status stays under the size Kubernetes stores, whatever the number of adapters."""

from __future__ import annotations

import asyncio
import json
import time

from loraplane.crds.errors import APINotFoundError
from loraplane.crds.kube import KubeClient, load_configuration
from loraplane.crds.models import AdapterInfo, LoRAWorkerSpec, WorkerAdapterReport, WorkerCapacity
from loraplane.worker.report import MAX_STATUS_BYTES, WorkerReport


def _report(n: int) -> WorkerReport:
    info = AdapterInfo(rank=16, alpha=32, useRslora=False, targetModules=["q_proj", "k_proj", "v_proj", "o_proj"],
                       sizeBytes=1 << 20, sha256="a" * 64, resolvedRevision="b" * 40)  # fmt: skip
    reports = [
        WorkerAdapterReport(id=i, adapter=f"team-{i % 7}/adapter-{i:05d}", state="Ready", info=info)
        for i in range(1, n + 1)
    ]
    spec = LoRAWorkerSpec(
        baseModel="m", capacity=WorkerCapacity(maxLoras=8, maxLoraRank=64, maxCpuLoras=64, cacheBytes=0)
    )
    return WorkerReport(None, name="w", namespace="ns", spec=spec, adapters=lambda: reports)  # type: ignore[arg-type]


def test_small_reports_keep_every_detail():
    body = _report(10).status_body()
    assert body["ready"] == 10 and all(a["info"]["sha256"] == "a" * 64 for a in body["adapters"])


def test_large_reports_drop_details_but_keep_every_state():
    body = _report(6000).status_body()
    assert len(json.dumps(body)) <= MAX_STATUS_BYTES
    assert body["ready"] == 6000 and len(body["adapters"]) == 6000
    assert all(a["state"] == "Ready" and "info" not in a for a in body["adapters"])


def test_device_slot_changes_are_reported_before_the_heartbeat(kube, namespace):
    # The engine moves adapters in and out of device slots on its own thread, without a mark_dirty():
    # the report must still show it within seconds, not at the next heartbeat (here 60 s away).
    kube.apply_crds()
    slots: set[int] = set()
    report = WorkerReport(
        None,  # type: ignore[arg-type]
        name="slots",
        namespace=namespace,
        spec=_report(0).spec,
        adapters=lambda: [
            WorkerAdapterReport(id=i, adapter=f"{namespace}/a{i}", state="Ready") for i in (1, 2)
        ],
        on_device=lambda: set(slots),
        heartbeat_seconds=60,
    )

    async def go() -> list[bool]:
        report.api = KubeClient(load_configuration(kube.kubeconfig))
        task = asyncio.create_task(report.run())
        try:
            seen = []
            for want in ({1}, {1, 2}, {2}):
                slots.clear()
                slots.update(want)
                t0 = time.monotonic()
                while time.monotonic() - t0 < 10:
                    try:
                        obj = await report.api.request("GET", report.path)
                    except APINotFoundError:  # not created yet
                        obj = {}
                    got = {
                        a["id"] for a in (obj.get("status") or {}).get("adapters", []) if a.get("onDevice")
                    }
                    if got == want:
                        break
                    await asyncio.sleep(0.2)
                seen.append(got == want and time.monotonic() - t0 < 5)
            return seen
        finally:
            task.cancel()
            await report.api.close()

    assert asyncio.run(go()) == [True, True, True]
