"""Condition types and reasons, the one function that sets a condition, and one setter per type.

Conditions follow the Kubernetes shape (type, status, reason, message, lastTransitionTime,
observedGeneration). They change only through ``set_condition`` (kueue's habit: it sets
observedGeneration, truncates the message and reports whether anything changed, so callers write and
post an Event only on a real transition). The per-type setters below hold the reasons and the
wording, so the operator's status computation and its Events say the same thing.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

# Condition types of a LoRAAdapter.
ID_ASSIGNED = "IDAssigned"
NAME_AVAILABLE = "NameAvailable"
VALIDATED = "Validated"
READY = "Ready"
THROTTLED = "Throttled"  # only on adapters with spec.limits: a worker refused a request over them lately

ConditionStatus = Literal["True", "False", "Unknown"]

# Reasons the operator sets itself. Other reasons come from elsewhere and are passed through as they
# are: the ledger's (LedgerMissing, ...), a worker's (RankTooLarge, CacheFull, ...), InvalidSpec.
ASSIGNED = "Assigned"
NAME_CLAIMED = "NameClaimed"
NAME_TAKEN = "NameTaken"
WORKER_VALIDATED = "WorkerValidated"
WORKER_FAILED = "WorkerFailed"
NOT_YET_VALIDATED = "NotYetValidated"
READY_REASON = "Ready"
LOADING = "Loading"  # Workers are prefetching and validating it.
NO_WORKERS = "NoWorkers"  # No live worker serves its base model (yet).
WAITING_FOR_ENGINE = "WaitingForEngine"  # Validated; the worker's engine is still loading the base model.
OVER_LIMIT = "OverLimit"  # Throttled=True: workers answer 429 for it.
WITHIN_LIMITS = "WithinLimits"

# Reasons of a normal course of events; any other reason on a False condition is a problem to act on
# (an Event of type Warning).
NORMAL_REASONS = frozenset(
    {
        ASSIGNED,
        NAME_CLAIMED,
        WORKER_VALIDATED,
        NOT_YET_VALIDATED,
        READY_REASON,
        LOADING,
        NO_WORKERS,
        WAITING_FOR_ENGINE,
        OVER_LIMIT,
        WITHIN_LIMITS,
    }
)


def is_warning(reason: str) -> bool:
    return reason not in NORMAL_REASONS


MESSAGE_MAX = 1024  # Kubernetes allows 32 KiB; a condition message should stay readable in kubectl.


def now() -> str:
    """The current time as Kubernetes writes it in conditions (RFC 3339, seconds, UTC)."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def truncate(message: str, limit: int = MESSAGE_MAX) -> str:
    return message if len(message) <= limit else message[: limit - 3] + "..."


def set_condition(
    conditions: list[dict],
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    *,
    generation: int | None = None,
    timestamp: str | None = None,
) -> bool:
    """Set condition ``type_`` in ``conditions`` in place; return True when it changed.

    lastTransitionTime moves only when ``status`` flips, as in Kubernetes; reason, message and
    observedGeneration are updated in place without a transition.
    """
    message = truncate(message)
    for cond in conditions:
        if cond.get("type") != type_:
            continue
        changed = (
            cond.get("status") != status
            or cond.get("reason") != reason
            or cond.get("message") != message
            or (generation is not None and cond.get("observedGeneration") != generation)
        )
        if cond.get("status") != status:
            cond["lastTransitionTime"] = timestamp or now()
        cond.update(status=status, reason=reason, message=message)
        if generation is not None:
            cond["observedGeneration"] = generation
        return changed
    new: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": timestamp or now(),
    }
    if generation is not None:
        new["observedGeneration"] = generation
    conditions.append(new)
    return True


def get_condition(conditions: list[dict] | None, type_: str) -> dict | None:
    return next((c for c in conditions or [] if c.get("type") == type_), None)


def is_true(conditions: list[dict] | None, type_: str) -> bool:
    cond = get_condition(conditions, type_)
    return cond is not None and cond.get("status") == "True"


# ---- one setter per condition type ------------------------------------------------------------------


def set_id_assigned(conditions: list[dict], adapter_id: int, version: str, generation: int | None) -> bool:
    return set_condition(
        conditions,
        ID_ASSIGNED,
        "True",
        ASSIGNED,
        f"ID {adapter_id} for version {version}",
        generation=generation,
    )


def set_id_not_assigned(conditions: list[dict], reason: str, message: str, generation: int | None) -> bool:
    return set_condition(conditions, ID_ASSIGNED, "False", reason, message, generation=generation)


def set_name_available(
    conditions: list[dict], served: str, base_model: str, holder: str | None, generation: int | None
) -> bool:
    """``holder``: the adapter (namespace/name) that holds the served name, None when this one does."""
    if holder is None:
        message = f"served name {served!r} for base model {base_model} belongs to this adapter"
        return set_condition(conditions, NAME_AVAILABLE, "True", NAME_CLAIMED, message, generation=generation)
    message = (
        f"served name {served!r} for base model {base_model} is held by {holder} (the oldest claimant); "
        f"set spec.name to another name, or delete {holder}"
    )
    return set_condition(conditions, NAME_AVAILABLE, "False", NAME_TAKEN, message, generation=generation)


def set_validated(
    conditions: list[dict], status: ConditionStatus, reason: str, message: str, generation: int | None
) -> bool:
    return set_condition(conditions, VALIDATED, status, reason, message, generation=generation)


def set_throttled(conditions: list[dict], workers: int, first: str | None, generation: int | None) -> bool:
    """``workers``: live workers that refused a request over the adapter's limits lately (within each
    worker's --throttled-seconds, a minute by default)."""
    if workers:
        message = f"{workers} worker(s) answered 429 over spec.limits lately (first: {first})"
        return set_condition(conditions, THROTTLED, "True", OVER_LIMIT, message, generation=generation)
    message = "no worker refused a request over spec.limits lately"
    return set_condition(conditions, THROTTLED, "False", WITHIN_LIMITS, message, generation=generation)


def set_ready(
    conditions: list[dict], status: ConditionStatus, reason: str, message: str, generation: int | None
) -> bool:
    return set_condition(conditions, READY, status, reason, message, generation=generation)
