"""The LoRAWorker report stays small and each write carries only what changed, whatever the number of
adapters; the operator's reading of it (operator/aggregate.py) gets back every state."""

from __future__ import annotations

import asyncio
import json
import time

from loraplane.crds import ranges
from loraplane.crds.models import AdapterInfo, LoRAWorkerSpec, WorkerAdapterReport, WorkerCapacity
from loraplane.errors import APINotFoundError
from loraplane.kube import KubeClient, load_configuration
from loraplane.operator.aggregate import worker_view
from loraplane.worker.report import MAX_EXCEPTIONS, RECENT_READY, WorkerReport

SPEC = LoRAWorkerSpec(
    baseModel="m", capacity=WorkerCapacity(maxLoras=8, maxLoraRank=64, maxCpuLoras=64, cacheBytes=0)
)
INFO = AdapterInfo(rank=16, alpha=32, useRslora=False, targetModules=["q_proj", "k_proj", "v_proj", "o_proj"],
                   sizeBytes=1 << 20, sha256="a" * 64, resolvedRevision="b" * 40)  # fmt: skip


def _rep(i: int, state: str = "Ready", **extra) -> WorkerAdapterReport:
    info = INFO if state == "Ready" else None
    return WorkerAdapterReport(id=i, adapter=f"team-{i % 7}/adapter-{i:05d}", state=state, info=info, **extra)


def _offline(reports: dict[int, WorkerAdapterReport], api=None, **kw) -> WorkerReport:
    return WorkerReport(api, name="w", namespace="ns", spec=SPEC, lookup=reports.get, known_ids=lambda: reports, **kw)  # type: ignore[arg-type]  # fmt: skip


def _view(status: dict) -> dict[int, str]:
    obj = {"metadata": {"name": "w", "namespace": "ns"}, "spec": SPEC.model_dump(), "status": status}
    view, _ = worker_view(obj)
    assert view is not None
    return {i: view.report(i)["state"] for i in view.states}


def test_a_2000_adapter_report_stays_small_and_a_change_writes_only_itself():
    reports = {i: _rep(i) for i in range(1, 2001)}
    reports.update(
        {i: _rep(i, "Failed", reason="RankTooLarge", message="rank 128 > 64 " * 20) for i in (5, 900)}
    )
    report = _offline(reports)
    report._absorb()
    full = report.status_body()
    size = len(json.dumps(full))
    # Ranges for the 1,998 Ready ones, details for the 2 failures and the last Ready ones' info.
    assert size < 20_000, size
    assert full["ready"] == 1998 and full["failed"] == 2 and full["loading"] == 0
    assert full["adapters"]["900"]["reason"] == "RankTooLarge"
    assert len(full["adapters"]) == 2 + RECENT_READY
    assert _view(full) == {i: r.state for i, r in reports.items()}
    report._full = False
    report._pending_blocks.clear()
    report._pending_details.clear()
    # One adapter fails: the next write is a patch of its block, its detail and the counts.
    reports[1500] = _rep(1500, "Failed", reason="HiddenSizeMismatch", message="4096 != 2048")
    report.mark_dirty(1500)
    report._absorb()
    delta = report.delta_body()
    assert len(json.dumps(delta)) < 600, delta
    assert set(delta["readyIds"]) == {"1000"} and delta["failedIds"] == {"1000": "1500"}
    assert set(delta["adapters"]) == {"1500"}


def test_ten_thousand_adapters_fit_in_the_bound_even_failing():
    reports = {i: _rep(i, "Failed", reason="RankTooLarge", message="x" * 2000) for i in range(1, 10_001, 2)}
    reports.update({i: _rep(i) for i in range(2, 10_001, 2)})  # interleaved: the worst case for ranges
    report = _offline(reports)
    report._absorb()
    body = report.status_body()
    assert len(json.dumps(body)) < 256 * 1024
    assert body["failed"] == 5000 and body["ready"] == 5000
    assert sum(d["state"] == "Failed" for d in body["adapters"].values()) == MAX_EXCEPTIONS
    assert _view(body) == {i: r.state for i, r in reports.items()}


def test_details_freed_by_a_recovery_go_to_the_failures_waiting_for_room():
    reports = {i: _rep(i, "Failed", reason="R", message="m") for i in range(1, MAX_EXCEPTIONS + 11)}
    report = _offline(reports)
    report._absorb()
    assert str(MAX_EXCEPTIONS + 10) not in report.status_body()["adapters"]
    for i in range(1, 11):
        reports[i] = _rep(i)
        report.mark_dirty(i)
    report._absorb()
    details = report.status_body()["adapters"]
    assert details[str(MAX_EXCEPTIONS + 10)]["state"] == "Failed" and details["1"]["state"] == "Ready"


def test_writes_against_the_server_cost_changes_not_adapters(kube, namespace):
    kube.apply_crds()
    reports = {i: _rep(i) for i in range(1, 3001)}

    async def go() -> tuple[int, int, dict]:
        api = KubeClient(load_configuration(kube.kubeconfig))
        report = WorkerReport(api, name="big", namespace=namespace, spec=SPEC, lookup=reports.get, known_ids=lambda: reports)  # fmt: skip
        try:
            await report.ensure_object()
            await report.write_status()
            first = report.bytes_written
            for i in (7, 2500):
                reports[i] = _rep(i, "Failed", reason="R", message="m")
                report.mark_dirty(i)
            await report.write_status()
            second = report.bytes_written - first
            await report.write_status()  # a heartbeat
            heartbeat = report.bytes_written - first - second
            obj = await api.request("GET", report.path)
            return second, heartbeat, obj
        finally:
            await api.close()

    second, heartbeat, obj = asyncio.run(go())
    assert second < 700 and heartbeat < 300, (second, heartbeat)
    assert len(json.dumps(obj)) < 30_000
    assert _view(obj["status"]) == {i: r.state for i, r in reports.items()}


def test_device_slot_changes_are_reported_before_the_heartbeat(kube, namespace):
    # The engine moves adapters in and out of device slots on its own thread, without a mark_dirty():
    # the report must still show it within seconds, not at the next heartbeat (here 60 s away).
    kube.apply_crds()
    slots: set[int] = set()
    reports = {i: WorkerAdapterReport(id=i, adapter=f"{namespace}/a{i}", state="Ready") for i in (1, 2)}
    report = WorkerReport(
        None,  # type: ignore[arg-type]
        name="slots",
        namespace=namespace,
        spec=SPEC,
        lookup=reports.get,
        known_ids=lambda: reports,
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
                    status = obj.get("status") or {}
                    got = set(ranges.decode(status.get("onDeviceIds") or ""))
                    if got == want and status.get("onDevice") == len(want):
                        break
                    await asyncio.sleep(0.2)
                seen.append(got == want and time.monotonic() - t0 < 5)
            return seen
        finally:
            task.cancel()
            await report.api.close()

    assert asyncio.run(go()) == [True, True, True]


def test_waiting_names_the_busiest_adapters_and_drops_the_quiet_ones():
    """status.waiting (the demand the operator scales replicas by) holds the 16 adapters with the most
    waiting requests; a merge patch removes the ones no longer named, and the operator reads it back."""
    from loraplane.worker.report import MAX_WAITING

    reports = {i: _rep(i) for i in range(1, 41)}
    waiting = {i: i for i in range(1, 41)}  # adapter i has i requests waiting
    rep = _offline(reports, waiting=lambda: dict(waiting), assigned=lambda: len(reports))
    rep._absorb()
    full = rep.status_body()
    assert full["assigned"] == 40
    assert full["waiting"] == {str(i): i for i in range(40, 40 - MAX_WAITING, -1)}
    waiting.clear()
    waiting.update({3: 2, 40: 0})
    delta = rep.delta_body()["waiting"]
    assert delta["3"] == 2 and delta["40"] is None and all(delta[str(i)] is None for i in range(25, 40))
    obj = {
        "metadata": {"name": "w", "namespace": "ns"},
        "spec": SPEC.model_dump(),
        "status": {"waiting": {"3": 2}},
    }
    view, _ = worker_view(obj)
    assert view is not None and view.waiting == {3: 2}
