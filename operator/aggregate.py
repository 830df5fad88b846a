"""LoRAWorker reports -> one adapter's status.workers, phase, message, and adapter info.

Workers never write LoRAAdapter objects; each reports every adapter it has, keyed by ID, in its own
LoRAWorker. A worker counts only while it is alive: its Pod exists (when it names one) and its heartbeat
is within the window. Everything here is pure, so every replica computes the same answer.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from loraplane.crds import conditions as cond
from loraplane.crds.models import LoRAWorker, describe_errors

log = logging.getLogger("loraplane.operator.aggregate")


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass
class WorkerView:
    """What the operator keeps of one LoRAWorker."""

    namespace: str
    name: str
    base_model: str
    pod_name: str | None
    heartbeat: float | None
    reports: dict[int, dict[str, Any]] = field(default_factory=dict)
    pod_alive: bool = True

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def live(self, now: float, window: float) -> bool:
        fresh = self.heartbeat is not None and now - self.heartbeat <= window
        return fresh and (self.pod_name is None or self.pod_alive)


def worker_view(obj: dict[str, Any]) -> WorkerView | None:
    """Validate a LoRAWorker; an invalid one is logged and ignored (it counts nowhere)."""
    meta = obj.get("metadata") or {}
    try:
        worker = LoRAWorker.model_validate(obj)
    except ValidationError as exc:
        log.warning(
            "loraworker %s/%s ignored: %s", meta.get("namespace"), meta.get("name"), describe_errors(exc)
        )
        return None
    status = worker.status
    reports = {r.id: r.model_dump(exclude_none=True) for r in (status.adapters or [])} if status else {}
    return WorkerView(
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        base_model=worker.spec.baseModel,
        pod_name=worker.spec.podName,
        heartbeat=parse_time(status.heartbeatTime if status else None),
        reports=reports,
    )


@dataclass
class Aggregate:
    """The fleet's view of one adapter version."""

    ready: int = 0
    failed: int = 0
    total: int = 0
    failure: str | None = None  # "worker ns/name: Reason: message" of the first failing worker.
    failure_reason: str | None = None
    waiting: int = 0  # Workers still preparing it that report why they wait (CacheFull, WaitingForEngine).
    wait: str | None = None  # "worker ns/name: Reason: message" of the first of them.
    wait_reason: str | None = None
    info: dict[str, Any] | None = None
    previous_in_use: bool = False
    all_switched: bool = False

    @property
    def counts(self) -> dict[str, int]:
        return {"ready": self.ready, "failed": self.failed, "total": self.total}


def aggregate(
    adapter_id: int,
    previous_id: int | None,
    base_model: str,
    workers: list[WorkerView],
    now: float,
    window: float,
) -> Aggregate:
    """Count live workers of ``base_model`` and their reports for ``adapter_id`` (workers sorted by name)."""
    agg = Aggregate()
    switched = 0
    for w in sorted(workers, key=lambda w: w.ref):
        if w.base_model != base_model or not w.live(now, window):
            continue
        agg.total += 1
        if previous_id is not None and previous_id in w.reports:
            agg.previous_in_use = True
        report = w.reports.get(adapter_id)
        if report is None:
            continue
        switched += 1
        if report.get("state") == "Ready":
            agg.ready += 1
            if agg.info is None and report.get("info"):
                agg.info = report["info"]
        elif report.get("state") == "Failed":
            agg.failed += 1
            if agg.failure is None:
                agg.failure_reason = report.get("reason") or cond.WORKER_FAILED
                agg.failure = _why(w, agg.failure_reason, report)
        elif report.get("reason"):
            agg.waiting += 1
            if agg.wait is None:
                agg.wait_reason = report["reason"]
                agg.wait = _why(w, agg.wait_reason, report)
    agg.all_switched = agg.total > 0 and switched == agg.total and not agg.previous_in_use
    return agg


def _why(worker: WorkerView, reason: str, report: dict[str, Any]) -> str:
    return f"worker {worker.ref}: {reason}: {report.get('message', '')}".rstrip(": ")


def phase_of(agg: Aggregate) -> tuple[str, str, str | None]:
    """Phase, the Ready condition's reason, and the message, from the counts: Failed (all reporting
    failed), Degraded (some), Ready, or Registered (no worker yet, loading, or waiting on a worker)."""
    if agg.failed and not agg.ready:
        return "Failed", agg.failure_reason or cond.WORKER_FAILED, agg.failure
    if agg.failed:
        message = f"{agg.failed} of {agg.total} workers failed; first: {agg.failure}"
        return "Degraded", agg.failure_reason or cond.WORKER_FAILED, message
    if agg.ready:
        return "Ready", cond.READY_REASON, None
    if agg.total == 0:
        return "Registered", cond.NO_WORKERS, "no live worker serves this base model yet"
    if agg.waiting:
        return (
            "Registered",
            agg.wait_reason or cond.LOADING,
            f"waiting on {agg.waiting} of {agg.total} workers; first: {agg.wait}",
        )
    return "Registered", cond.LOADING, f"loading on {agg.total} workers"
