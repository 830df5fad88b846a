"""Kubernetes Events for an adapter's status transitions: what to say (pure) and posting it (background).

One Event per status write that changes the ID, the served name's availability, the phase or the
Ready condition's reason: Events are API writes too, so the notes of one write are joined into one.
Its reason is the most telling note's: a failure's own reason (RankTooLarge, LedgerMissing, NameTaken,
CacheFull, ...) with type Warning; otherwise IDAssigned, NameClaimed or the new Ready reason, Normal.
A note never repeats what another note of the same Event already says.

Throttling is noted when the Throttled condition flips, not per 429: OverLimit (Warning) when workers
start refusing requests over spec.limits, WithinLimits (Normal) when none has for its
--throttled-seconds (a minute by default), which bounds how often an adapter's throttling Events come.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

from loraplane.crds import conditions as cond
from loraplane.crds.models import ADAPTER_KIND, API_VERSION
from loraplane.errors import APIError
from loraplane.kube import KubeClient

log = logging.getLogger("loraplane.operator.events")

ID_ASSIGNED = "IDAssigned"
PLACEMENT_WARNINGS = {"InsufficientCapacity"}  # placement reasons that need a hand (more workers, room)


@dataclass(frozen=True)
class Note:
    reason: str
    message: str
    warning: bool = False


def transition(old: dict[str, Any], new: dict[str, Any]) -> Note | None:
    """The one Event (reason, message, Warning or not) for a status change from ``old`` to ``new``."""
    notes: list[Note] = []
    if new.get("id") and new.get("id") != old.get("id"):
        replacing = new.get("previousId") and new.get("previousId") == old.get("id")
        extra = f", replacing ID {new['previousId']}" if replacing else ""
        notes.append(Note(ID_ASSIGNED, f"assigned ID {new['id']} to version {new.get('version')}{extra}"))
    old_name = cond.get_condition(old.get("conditions"), cond.NAME_AVAILABLE) or {}
    new_name = cond.get_condition(new.get("conditions"), cond.NAME_AVAILABLE)
    if new_name and old_name.get("status") != new_name.get("status"):
        notes.append(Note(new_name["reason"], new_name["message"], new_name["status"] != "True"))
    old_placed, new_placed = old.get("placement") or {}, new.get("placement") or {}
    if new_placed and (
        old_placed.get("workers") != new_placed.get("workers")
        or old_placed.get("reason") != new_placed.get("reason")
    ):
        reason = new_placed.get("reason") or "Placed"
        notes.append(Note(reason, new_placed.get("message") or "", reason in PLACEMENT_WARNINGS))
    old_throttled = cond.get_condition(old.get("conditions"), cond.THROTTLED) or {}
    new_throttled = cond.get_condition(new.get("conditions"), cond.THROTTLED) or {}
    if (old_throttled.get("status") == "True") != (new_throttled.get("status") == "True"):
        if new_throttled.get("status") == "True":
            notes.append(Note(cond.OVER_LIMIT, f"throttled: {new_throttled.get('message')}", True))
        else:  # cleared, or spec.limits removed (no condition then)
            why = new_throttled.get("message") or "spec.limits removed"
            notes.append(Note(cond.WITHIN_LIMITS, f"no longer throttled: {why}"))
    old_ready = cond.get_condition(old.get("conditions"), cond.READY) or {}
    new_ready = cond.get_condition(new.get("conditions"), cond.READY) or {}
    if old.get("phase") != new.get("phase") or old_ready.get("reason") != new_ready.get("reason"):
        reason = new_ready.get("reason") or str(new.get("phase"))
        said = {n.message for n in notes}
        why = f": {new['message']}" if new.get("message") and new["message"] not in said else ""
        moved = (
            f"phase {old['phase']} -> {new.get('phase')}" if old.get("phase") else f"phase {new.get('phase')}"
        )
        failing = new.get("phase") in ("Failed", "Degraded")
        notes.append(
            Note(
                reason,
                moved + why,
                failing or (new_ready.get("status") == "False" and cond.is_warning(reason)),
            )
        )
    if not notes:
        return None
    # The most telling note names the Event: a warning first, then the ID, then the rest in order.
    first = min(range(len(notes)), key=lambda i: (not notes[i].warning, notes[i].reason != ID_ASSIGNED, i))
    return Note(notes[first].reason, "; ".join(n.message for n in notes), any(n.warning for n in notes))


LANES = 8  # Events posted at once; one object's Events share a lane, so they keep their order


class EventPoster:
    """Posts Events in the background, so status writes (the IDs) never queue behind them. One
    object's Events are posted in order; up to LANES objects' at once (one at a time fell minutes
    behind when thousands of adapters turned Ready together)."""

    def __init__(self, api: KubeClient, instance: str) -> None:
        self.api = api
        self.instance = instance
        self._queues: list[asyncio.Queue[tuple[dict[str, Any], Note]]] = [
            asyncio.Queue() for _ in range(LANES)
        ]
        self._tasks: list[asyncio.Task[None] | None] = [None] * LANES

    def post(self, obj: dict[str, Any], note: Note) -> None:
        lane = hash((obj.get("metadata") or {}).get("uid")) % LANES
        self._queues[lane].put_nowait((obj, note))
        task = self._tasks[lane]
        if task is None or task.done():
            self._tasks[lane] = asyncio.get_running_loop().create_task(self._drain(lane))

    async def drained(self) -> None:
        """Wait until every Event queued so far is posted (tests, shutdown)."""
        await asyncio.gather(*(t for t in self._tasks if t is not None))

    async def _drain(self, lane: int) -> None:
        queue = self._queues[lane]
        while not queue.empty():
            await self._post(*queue.get_nowait())

    async def _post(self, obj: dict[str, Any], note: Note) -> None:
        meta = obj["metadata"]
        now = cond.now()
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": API_VERSION,
                "kind": ADAPTER_KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": note.reason,
            "message": cond.truncate(note.message),
            "type": "Warning" if note.warning else "Normal",
            "source": {"component": "loraplane-operator"},
            "reportingComponent": "loraplane-operator",
            "reportingInstance": self.instance,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self.api.request("POST", f"/api/v1/namespaces/{meta['namespace']}/events", body=event)
        except APIError as exc:
            log.debug("event for %s/%s not posted: %s", meta["namespace"], meta["name"], exc)
