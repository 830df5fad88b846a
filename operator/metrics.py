"""Prometheus metrics of the operator (served on --metrics-port), all prefixed ``loraplane_operator_``.

What the alerts in the chart read: IDs assigned and adapters still waiting for one (allocation
stopped), adapters by phase (Failed), workers by liveness (missing heartbeats), and when the periodic
check last ran (the operator itself stuck). No ``_created`` series (see ``loraplane.telemetry``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

from loraplane import telemetry

telemetry.build_info("operator")

IDS_ASSIGNED = Counter("loraplane_operator_ids_assigned_total", "Adapter IDs written to adapters' status.")
ALLOCATION_CONFLICTS = Counter(
    "loraplane_operator_allocation_conflicts_total",
    "resourceVersion conflicts (409) on the ID ledger or an adapter's status, each re-read and retried.",
)
HANDLER_DURATION = Histogram(
    "loraplane_operator_handler_duration_seconds",
    "Time spent in one handler call.",
    ["handler"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
RECONCILES = Counter(
    "loraplane_operator_adapter_reconciles_total",
    "Adapter statuses recomputed, by what triggered it: adapter (its own event), worker (a worker's "
    "report of that adapter changed, or a worker came or went), tick (waiting for an ID), demand (replicas "
    "changed by the requests waiting for it).",
    ["trigger"],
)
ADAPTERS = Gauge("loraplane_operator_adapters", "Adapters this operator sees, by status.phase.", ["phase"])
WAITING_FOR_ID = Gauge(
    "loraplane_operator_adapters_waiting_for_id",
    "Adapters that need an ID (new, or a new version) and have none yet; stays above 0 when allocation "
    "is stuck (ledger missing, RBAC, API errors).",
)
WORKERS = Gauge(
    "loraplane_operator_workers",
    "LoRAWorker objects by base model and liveness: live (heartbeat within the window and Pod present) "
    "or stale (counted out of adapters' status).",
    ["base_model", "state"],
)
LAST_TICK = Gauge(
    "loraplane_operator_last_tick_timestamp_seconds",
    "Unix time the periodic check (worker liveness, adapters waiting for an ID) last completed.",
)

PHASES = ("Pending", "Registered", "Ready", "Degraded", "Failed")
_seen: set[tuple[str, str]] = set()  # (base model, state) label sets set so far: a gone pool reads 0


def set_phase_counts(counts: dict[str, int]) -> None:
    for phase in PHASES:
        ADAPTERS.labels(phase=phase).set(counts.get(phase, 0))


def set_tick(*, waiting_for_id: int, workers: Iterable[tuple[str, bool]]) -> None:
    """After a periodic check: adapters without an ID, and (base model, live) for every worker."""
    WAITING_FOR_ID.set(waiting_for_id)
    counts: dict[tuple[str, str], int] = {}
    for base_model, live in workers:
        key = (base_model, "live" if live else "stale")
        counts[key] = counts.get(key, 0) + 1
    for base_model, state in _seen - set(counts):
        WORKERS.labels(base_model=base_model, state=state).set(0)
    for (base_model, state), n in counts.items():
        WORKERS.labels(base_model=base_model, state=state).set(n)
        _seen.add((base_model, state))
    LAST_TICK.set(time.time())
