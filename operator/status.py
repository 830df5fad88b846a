"""One adapter's desired status, as a pure function of what the operator knows about it.

The reconciler gathers the inputs (the parsed adapter, the ID decision and the ID it took, who holds
the served name, the workers' aggregate) and writes the result; everything here is deterministic, so
every replica computes the same status from the same objects, and tests need no cluster.

Phase and the Ready condition, first match wins:
  invalid spec                        Failed      InvalidSpec
  no ID (the ledger stopped)          Pending     the ledger's reason (LedgerMissing, ...)
  served name held by another         Pending     NameTaken
  workers' aggregate                  Failed / Degraded / Ready / Registered, see aggregate.phase_of
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from loraplane.crds import conditions as cond
from loraplane.crds.models import INVALID_SPEC, LoRAAdapter
from loraplane.errors import LoraplaneError
from loraplane.operator.aggregate import Aggregate, phase_of

MESSAGE_MAX = 4096  # status.message's schema limit


@dataclass(frozen=True)
class IdState:
    """The ID part of the decision: the ID this version has (None: none yet), the one it replaces,
    and why it has none (the ledger's error) when allocation is stopped."""

    id: int | None
    version: str
    previous_id: int | None = None
    waiting: LoraplaneError | None = None


def _copy(status: dict[str, Any]) -> dict[str, Any]:
    """A copy that the setters below may change: they replace values and change conditions in place,
    so a copy of the top level and of each condition is enough (a deepcopy cost a tenth of the
    operator's CPU per adapter)."""
    out = dict(status)
    if isinstance(out.get("conditions"), list):
        out["conditions"] = [dict(c) if isinstance(c, dict) else c for c in out["conditions"]]
    return out


def _base(obj: dict[str, Any]) -> tuple[dict[str, Any], list[dict], int | None]:
    status = _copy(obj.get("status") or {})
    generation = (obj.get("metadata") or {}).get("generation")
    status["observedGeneration"] = generation
    conditions: list[dict] = status.setdefault("conditions", [])
    return status, conditions, generation


def _finish(status: dict[str, Any], phase: str, message: str | None) -> dict[str, Any]:
    status["phase"] = phase
    if message:
        status["message"] = cond.truncate(message, MESSAGE_MAX)
    else:
        status.pop("message", None)
    return status


def invalid(obj: dict[str, Any], error: LoraplaneError) -> dict[str, Any]:
    """The status of an adapter whose spec does not parse: Failed, every condition saying why."""
    status, conds, gen = _base(obj)
    message = f"invalid spec: {error.message}"
    cond.set_validated(conds, "False", INVALID_SPEC, message, gen)
    cond.set_ready(conds, "False", INVALID_SPEC, message, gen)
    if not status.get("id"):
        cond.set_id_not_assigned(conds, INVALID_SPEC, message, gen)
    return _finish(status, "Failed", message)


def desired(
    obj: dict[str, Any],
    adapter: LoRAAdapter,
    ids: IdState,
    holder: str | None,
    agg: Aggregate | None,
    placement: dict[str, Any] | None = None,
    placed_ready: int = 0,
) -> dict[str, Any]:
    """The status ``obj`` should have. ``holder``: the adapter holding its served name when another one
    does (None: this one); ``agg``: the workers' view of ``ids.id`` (None while it has no ID), counted
    over the workers of ``placement`` (status.placement; None: on every live worker), of which
    ``placed_ready`` (its draining workers not counted) have it Ready."""
    status, conds, gen = _base(obj)
    spec = adapter.spec
    if ids.waiting is not None:
        cond.set_id_not_assigned(conds, ids.waiting.reason, f"waiting for an ID: {ids.waiting.message}", gen)
    else:
        assert ids.id is not None, "an adapter not waiting for an ID has one"
        if status.get("id") != ids.id:
            status["id"], status["version"] = ids.id, ids.version
            if ids.previous_id is not None:
                status["previousId"] = ids.previous_id
        cond.set_id_assigned(conds, ids.id, ids.version, gen)
    status["servedName"] = adapter.served_name
    cond.set_name_available(conds, adapter.served_name, spec.baseModel, holder, gen)

    agg = agg if ids.waiting is None and agg is not None else Aggregate()
    status["workers"] = agg.counts
    if placement is None:
        status["ready"] = f"{agg.ready}/{agg.total}"
    else:  # Ready on the workers it is placed on, not counting those it is leaving
        status["ready"] = f"{placed_ready if ids.waiting is None else 0}/{placement['replicas']}"
    if placement is not None:
        status["placement"] = placement
    else:
        status.pop("placement", None)
    if agg.info:
        status["adapter"] = agg.info
    if status.get("previousId") is not None and agg.all_switched:
        status.pop("previousId")
    if agg.ready:
        cond.set_validated(
            conds, "True", cond.WORKER_VALIDATED, f"validated by {agg.ready} of {agg.total} workers", gen
        )
    elif agg.failed:
        cond.set_validated(conds, "False", agg.failure_reason or cond.WORKER_FAILED, agg.failure or "", gen)
    else:
        cond.set_validated(
            conds, "Unknown", cond.NOT_YET_VALIDATED, "no worker has validated the weights yet", gen
        )

    if spec.limits is not None:
        cond.set_throttled(conds, agg.throttled, agg.throttled_by, gen)
    phase, reason, message = phase_of(agg)
    if placement is not None and not placement["workers"] and phase == "Registered":
        reason, message = placement["reason"], placement["message"]  # placed nowhere: say why
    if ids.waiting is not None:
        phase, reason, message = "Pending", ids.waiting.reason, f"waiting for an ID: {ids.waiting.message}"
    elif holder is not None:
        phase, reason = "Pending", cond.NAME_TAKEN
        message = cond.get_condition(conds, cond.NAME_AVAILABLE)["message"]  # type: ignore[index]
    if phase == "Ready":
        cond.set_ready(conds, "True", cond.READY_REASON, f"ready on {agg.ready} of {agg.total} workers", gen)
    else:
        cond.set_ready(conds, "False", reason, message or phase, gen)
    return _finish(status, phase, message)
