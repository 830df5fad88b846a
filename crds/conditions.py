"""Condition types and reasons, and the one function that sets a condition.

Conditions follow the Kubernetes shape (type, status, reason, message, lastTransitionTime,
observedGeneration). They change only through ``set_condition``, which reports whether anything
changed so callers patch (and emit an Event) only on a real transition.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

# Condition types of a LoRAAdapter.
ID_ASSIGNED = "IDAssigned"
NAME_AVAILABLE = "NameAvailable"
VALIDATED = "Validated"
READY = "Ready"

ConditionStatus = Literal["True", "False", "Unknown"]

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
    new = {
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
