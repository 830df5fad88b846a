"""The ID ledger and the pure rules for picking an adapter's ID.

Why IDs stay unique (design.md, "ID allocation: the invariants"):
- The ledger ConfigMap's ``data.next`` is the lowest ID never handed out. An operator reserves the block
  [next, next+B) by writing next+B with the resourceVersion it read (one compare-and-swap); a 409 means
  another replica moved it first: re-read and retry. Two replicas therefore never hold the same block.
- An ID from a block reaches an adapter only in a status write that carries the adapter's
  resourceVersion and the version digest together, so two writers racing on one adapter cannot both
  win; the loser re-reads and keeps the ID already there for that version (idempotency).
- IDs are never freed; a crash loses the rest of a block as a gap. An ID returns to the local pool only
  after a 409, which proves it was never written.
- A ledger that is missing, unreadable, or not above every visible ID stops allocation until a human
  restores it or recovery is asked for explicitly; recovery starts above every visible ID plus a gap.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from loraplane.crds.models import ID_MAX, LoRAAdapterStatus
from loraplane.errors import APIConflictError, APINotFoundError, PermanentError
from loraplane.kube import KubeClient
from loraplane.operator import metrics
from loraplane.operator.settings import RECOVER_ANNOTATION, OperatorSettings

log = logging.getLogger("loraplane.operator.allocation")

LEDGER_MISSING = "LedgerMissing"
LEDGER_CORRUPTED = "LedgerCorrupted"
LEDGER_EXHAUSTED = "LedgerExhausted"
LEDGER_CONTENDED = "LedgerContended"


class LedgerError(PermanentError):
    """Allocation is stopped: the ledger cannot be trusted. The message says how to restore it."""


# ---- pure rules ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IdDecision:
    """What an adapter's status needs: keep its ID, or a new one (with the ID it replaces, if any)."""

    keep: bool
    previous_id: int | None = None


def decide(status: LoRAAdapterStatus | None, version: str) -> IdDecision:
    """Same version and an ID already there: keep it (re-running never gives a second ID)."""
    current = status.id if status is not None else None
    if current is not None and status is not None and status.version == version:
        return IdDecision(keep=True)
    return IdDecision(keep=False, previous_id=current)


def check_ledger(raw: Any, visible_max: int) -> int:
    """The ledger's next ID, or LedgerError when it is not an integer in range above every visible ID."""
    try:
        value = int(str(raw).strip())
    except (TypeError, ValueError):
        raise LedgerError(LEDGER_CORRUPTED, f"data.next is {raw!r}, not an integer") from None
    if value < 1:
        raise LedgerError(LEDGER_CORRUPTED, f"data.next is {value}, below 1")
    if value <= visible_max:
        raise LedgerError(
            LEDGER_CORRUPTED, f"data.next is {value}, not above the highest ID in use ({visible_max})"
        )
    if value > ID_MAX:
        raise LedgerError(LEDGER_EXHAUSTED, f"data.next is {value}: every 32-bit ID has been handed out")
    return value


def recovery_start(visible_max: int, gap: int) -> int:
    """Where a recovered ledger restarts: above every visible ID plus a safety gap."""
    return min(visible_max + gap + 1, ID_MAX)


def restore_hint(settings: OperatorSettings, visible_max: int) -> str:
    """The exact commands a human can run to restore the ledger safely."""
    ns, name = settings.ledger_namespace, settings.ledger_name
    safe = recovery_start(visible_max, settings.safety_gap)
    return (
        f"restore it with `kubectl -n {ns} create configmap {name} --from-literal=next={safe}` "
        f'(or `kubectl -n {ns} patch configmap {name} --type merge -p \'{{"data":{{"next":"{safe}"}}}}\'` '
        f"if it exists), or annotate it `kubectl -n {ns} annotate configmap {name} {RECOVER_ANNOTATION}=true`, "
        f"or restart the operator with --recover-ledger; {safe} is the highest visible ID {visible_max} "
        f"plus the safety gap {settings.safety_gap}"
    )


# ---- the ledger ------------------------------------------------------------------------------------


class Allocator:
    """Hands out IDs from blocks reserved in the ledger; one per operator process."""

    def __init__(self, api: KubeClient, settings: OperatorSettings, visible_max: Callable[[], int]) -> None:
        self.api = api
        self.settings = settings
        self._visible_max = visible_max
        self._pool: collections.deque[int] = collections.deque()
        self._lock = asyncio.Lock()
        self.highest_handed = 0  # The highest ID this process ever took out of a block.
        self.stopped: LedgerError | None = None
        self._stopped_at = 0.0

    def visible_max(self) -> int:
        return max(self._visible_max(), self.highest_handed)

    @property
    def _path(self) -> str:
        return f"/api/v1/namespaces/{self.settings.ledger_namespace}/configmaps/{self.settings.ledger_name}"

    async def take(self) -> int:
        """One fresh ID; raises LedgerError while allocation is stopped."""
        async with self._lock:
            if not self._pool:
                if self.stopped is not None and time.monotonic() - self._stopped_at < 1.0:
                    raise self.stopped  # Do not re-read the ledger for every waiting adapter.
                try:
                    await self._reserve()
                except LedgerError as exc:
                    self.stopped, self._stopped_at = exc, time.monotonic()
                    raise
                self.stopped = None
            new_id = self._pool.popleft()
            self.highest_handed = max(self.highest_handed, new_id)
            return new_id

    def give_back(self, id_: int) -> None:
        """Return an ID a 409 proved was never written anywhere."""
        self._pool.appendleft(id_)

    async def _reserve(self) -> None:
        block = self.settings.block_size
        for _ in range(self.settings.write_retries * 4):
            visible = self.visible_max()
            try:
                ledger: dict[str, Any] | None = await self.api.request("GET", self._path)
            except APINotFoundError:
                ledger = None
            if ledger is None:
                if visible > 0 and not self.settings.recover_ledger:
                    raise LedgerError(
                        LEDGER_MISSING,
                        f"the ID ledger configmap {self.settings.ledger_namespace}/{self.settings.ledger_name} "
                        f"is missing while IDs up to {visible} are in use; allocation is stopped; "
                        + restore_hint(self.settings, visible),
                    )
                start = recovery_start(visible, self.settings.safety_gap) if visible > 0 else 1
                body = {
                    "apiVersion": "v1",
                    "kind": "ConfigMap",
                    "metadata": {"name": self.settings.ledger_name},
                    "data": {"next": str(start + block)},
                }
                try:
                    await self.api.request("POST", self._path.rsplit("/", 1)[0], body=body)
                except APIConflictError:  # Another replica created it first.
                    metrics.ALLOCATION_CONFLICTS.inc()
                    continue
                except APINotFoundError:
                    raise LedgerError(
                        LEDGER_MISSING,
                        f"namespace {self.settings.ledger_namespace} for the ID ledger does not exist; "
                        f"create it or pass --ledger-namespace",
                    ) from None
                log.warning(
                    "ledger %s/%s created at next=%d (%s)",
                    self.settings.ledger_namespace,
                    self.settings.ledger_name,
                    start,
                    "recovered above visible IDs" if visible else "first install",
                )
                self._fill(start, block)
                return
            meta = ledger.get("metadata") or {}
            raw = (ledger.get("data") or {}).get("next")
            annotations = meta.get("annotations") or {}
            recover = self.settings.recover_ledger or annotations.get(RECOVER_ANNOTATION) == "true"
            try:
                start = check_ledger(raw, visible)
            except LedgerError as exc:
                if not recover or exc.reason == LEDGER_EXHAUSTED:
                    raise LedgerError(
                        exc.reason,
                        f"the ID ledger configmap {self.settings.ledger_namespace}/{self.settings.ledger_name} "
                        f"is corrupted ({exc.message}); allocation is stopped; "
                        + restore_hint(self.settings, visible),
                    ) from None
                start = recovery_start(visible, self.settings.safety_gap)
                log.warning("ledger recovered: %s; restarting at %d", exc.message, start)
            end = min(start + block, ID_MAX + 1)
            if end <= start:
                raise LedgerError(LEDGER_EXHAUSTED, "every 32-bit ID has been handed out")
            if RECOVER_ANNOTATION in annotations:
                annotations = {k: v for k, v in annotations.items() if k != RECOVER_ANNOTATION}
            ledger["metadata"] = {**meta, "annotations": annotations}
            ledger["data"] = {**(ledger.get("data") or {}), "next": str(end)}
            try:
                await self.api.request("PUT", self._path, body=ledger)  # Carries the resourceVersion read.
            except APIConflictError:
                metrics.ALLOCATION_CONFLICTS.inc()
                continue
            self._fill(start, end - start)
            return
        raise LedgerError(LEDGER_CONTENDED, "the ID ledger kept changing under this operator; will retry")

    def _fill(self, start: int, count: int) -> None:
        self._pool.extend(range(start, start + count))
        log.info("reserved IDs [%d, %d)", start, start + count)
