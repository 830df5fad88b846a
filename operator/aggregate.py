"""LoRAWorker reports -> one adapter's status.workers, phase, message, and adapter info.

Workers never write LoRAAdapter objects; each reports every adapter it has in its own LoRAWorker: the
IDs by state as range blocks, details for the exceptions (see worker/report.py). The operator keeps, per
worker, ID -> state and details (a WorkerView), updated from each new version of the object by decoding
only the blocks and details that changed, which also says which adapter IDs changed: only those
adapters are looked at again. A worker counts only while it is alive: its Pod exists (when it names
one) and its heartbeat is within the window. The aggregate of one adapter looks its ID up in each live
worker of its base model: O(workers), whatever the number of adapters. Every replica computes the same
answer from the same objects.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from loraplane.crds import conditions as cond
from loraplane.crds import ranges
from loraplane.crds.models import LoRAWorker, describe_errors

log = logging.getLogger("loraplane.operator.aggregate")


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


Report = dict[str, Any]  # state, and where the worker gave details: reason, message, info
_PLAIN = {kind: {"state": kind} for kind in ("Ready", "Failed", "Loading")}  # shared: no details
ID_SETS = {"readyIds": "Ready", "failedIds": "Failed", "loadingIds": "Loading"}


@dataclass
class WorkerView:
    """What the operator keeps of one LoRAWorker: per adapter ID its state (from the ID sets) and the
    details the worker gave, plus the raw blocks, so the next version is compared block by block."""

    namespace: str
    name: str
    base_model: str
    pod_name: str | None
    heartbeat: float | None
    states: dict[int, str] = field(default_factory=dict)  # id -> Ready / Failed / Loading
    details: dict[int, Report] = field(default_factory=dict)
    blocks: dict[str, dict[str, str]] = field(default_factory=dict)  # ID set -> block -> ranges
    max_id: int = 0
    pod_alive: bool = True
    throttled: set[int] = field(default_factory=set)  # IDs it refused requests for over their limits
    max_adapters: int = 0  # spec.capacity.maxAdapters (0: no count limit)
    cache_bytes: int = 0  # spec.capacity.cacheBytes
    default_replicas: int = 0  # spec.placement: the pool's replicas for adapters without spec.replicas
    max_replicas: int = 0  # spec.placement: the most replicas demand may raise an adapter to
    waiting: dict[int, int] = field(default_factory=dict)  # status.waiting: requests waiting per ID

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    def live(self, now: float, window: float) -> bool:
        fresh = self.heartbeat is not None and now - self.heartbeat <= window
        return fresh and (self.pod_name is None or self.pod_alive)

    def report(self, adapter_id: int) -> Report | None:
        """This worker's report of one ID (None: it does not have it)."""
        state = self.states.get(adapter_id)
        if state is None:
            return None
        return self.details.get(adapter_id) or _PLAIN[state]

    def same_reports(self, other: WorkerView) -> bool:
        return self.states == other.states and self.details == other.details


def _differs(old: Report | None, new: Report | None) -> bool:
    """A change that can move an adapter's status (details dropped from a Ready report cannot)."""
    if old is None or new is None:
        return old is not new
    keys = ("state", "reason", "message")
    return any(old.get(k) != new.get(k) for k in keys) or bool(new.get("info") and not old.get("info"))


def worker_view(
    obj: dict[str, Any], previous: WorkerView | None = None
) -> tuple[WorkerView | None, set[int]]:
    """Validate a LoRAWorker (an invalid one is logged and ignored: it counts nowhere) and return its
    view and the IDs whose report changed since ``previous``. Only the blocks and details that differ
    from ``previous`` are decoded, and ``previous``'s maps are taken over (updated in place), so a
    version that changed k adapters costs O(k + blocks + details), not O(adapters)."""
    meta = obj.get("metadata") or {}
    try:
        worker = LoRAWorker.model_validate(obj)
    except ValidationError as exc:
        log.warning(
            "loraworker %s/%s ignored: %s", meta.get("namespace"), meta.get("name"), describe_errors(exc)
        )
        return None, set(previous.states) if previous else set()
    status = worker.status
    view = WorkerView(
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        base_model=worker.spec.baseModel,
        pod_name=worker.spec.podName,
        heartbeat=parse_time(status.heartbeatTime if status else None),
        max_adapters=worker.spec.capacity.maxAdapters or 0,
        cache_bytes=worker.spec.capacity.cacheBytes,
        default_replicas=worker.spec.placement.defaultReplicas if worker.spec.placement else 0,
        max_replicas=worker.spec.placement.maxReplicas if worker.spec.placement else 0,
        waiting={int(k): v for k, v in ((status.waiting or {}) if status else {}).items() if k.isdigit()},
    )
    old_blocks: dict[str, dict[str, str]] = {}
    old_details: dict[int, Report] = {}
    if previous is not None:
        view.states, old_blocks, old_details = previous.states, previous.blocks, previous.details
    old_states: dict[int, str | None] = {}  # the IDs touched, with their state before this version
    for field_name, kind in ID_SETS.items():
        new = dict(getattr(status, field_name) or {}) if status else {}
        old = old_blocks.get(field_name, {})
        view.blocks[field_name] = new
        for block in old.keys() | new.keys():
            if old.get(block) == new.get(block):
                continue
            before = set(ranges.decode(old.get(block, "")))
            after = set(ranges.decode(new.get(block, "")))
            for i in before ^ after:
                old_states.setdefault(i, view.states.get(i))
            for i in before - after:
                if view.states.get(i) == kind:
                    del view.states[i]
            for i in after - before:
                view.states[i] = kind
        if new:
            last = new[max(new, key=int)]
            view.max_id = max(view.max_id, int(last.replace("-", ",").rsplit(",", 1)[-1]))
    view.throttled = set(ranges.decode(status.throttledIds or "")) if status else set()
    for i in view.throttled ^ (previous.throttled if previous is not None else set()):
        old_states.setdefault(i, view.states.get(i))
    for key, detail in ((status.adapters or {}) if status else {}).items():
        if key.isdigit():
            view.details[int(key)] = detail.model_dump(exclude_none=True)
    for i in old_details.keys() | view.details.keys():
        if old_details.get(i) != view.details.get(i):
            old_states.setdefault(i, view.states.get(i))
    changed = set()
    flipped = view.throttled ^ (previous.throttled if previous is not None else set())
    for i, state in old_states.items():
        old_report = old_details.get(i) or (_PLAIN[state] if state else None)
        if _differs(old_report, view.report(i)) or i in flipped:
            changed.add(i)
    return view, changed


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
    throttled: int = 0  # live workers that refused requests over its limits lately
    throttled_by: str | None = None  # the first of them

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
    only: set[str] | None = None,
) -> Aggregate:
    """Count live workers of ``base_model`` and their reports for ``adapter_id`` (workers sorted by name);
    ``only``: count just these workers (those the adapter is placed on)."""
    agg = Aggregate()
    switched = 0
    for w in sorted(workers, key=lambda w: w.ref):
        if w.base_model != base_model or not w.live(now, window):
            continue
        if only is not None and w.ref not in only:
            continue
        agg.total += 1
        if previous_id is not None and previous_id in w.states:
            agg.previous_in_use = True
        if adapter_id in w.throttled:
            agg.throttled += 1
            agg.throttled_by = agg.throttled_by or w.ref
        report = w.report(adapter_id)
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
