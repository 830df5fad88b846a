"""Prometheus metrics of the operator (served on --metrics-port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
ADAPTERS = Gauge("loraplane_operator_adapters", "Adapters this operator sees, by status.phase.", ["phase"])

PHASES = ("Pending", "Registered", "Ready", "Degraded", "Failed")


def set_phase_counts(counts: dict[str, int]) -> None:
    for phase in PHASES:
        ADAPTERS.labels(phase=phase).set(counts.get(phase, 0))
