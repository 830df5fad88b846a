"""The LoRAWorker status stays under the size Kubernetes stores, whatever the number of adapters."""

from __future__ import annotations

import json

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
