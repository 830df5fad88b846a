"""The worker's own LoRAWorker object: its capacity in spec, its adapters' states in status.

Created at start (ownerReference to the worker's Pod when the Pod exists, so it is garbage-collected
with it). The status is compact, so it stays small with tens of thousands of adapters: counts, the IDs
Ready / Failed / loading as range strings in blocks of IDs (crds/ranges.py), and details only for the
exceptions (Failed, waiting with a reason) and for the few adapters that became Ready last (what the
worker found in their weights, for the operator to copy into the adapter's status). Each write is a
merge patch of what changed since the last one (the blocks and details of the adapters that changed,
the counts, the heartbeat): O(changes) bytes, never O(adapters). Changes are coalesced over a short
interval into one write; a heartbeat is a write of the heartbeat alone. The first write (and one after
the object was recreated) replaces the whole status. Writes only this one object, never LoRAAdapter
objects. If the object disappears (deleted by hand, its Pod recreated), it is recreated.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import Counter

from loraplane.crds import ranges
from loraplane.crds.models import (
    API_VERSION,
    WORKER_KIND,
    WORKER_PLURAL,
    LoRAWorkerSpec,
    WorkerAdapterReport,
)
from loraplane.errors import APIConflictError, APIError, APINotFoundError
from loraplane.kube import Backoff, KubeClient

log = logging.getLogger(__name__)

STATUS_WRITES = Counter("loraplane_worker_report_writes", "LoRAWorker status writes (batches and heartbeats)")
SETTLE_FRACTION = 0.25  # of the batch interval: the wait before writing a change after a quiet spell
DEVICE_POLL_SECONDS = 1.0  # how often the engine's device slots are compared with the last report
MAX_EXCEPTIONS = 200  # details of Failed / waiting adapters kept in the object; the rest are in the ID sets
MAX_WAITING = 16  # adapters named in status.waiting (those with the most waiting requests)
RECENT_READY = 32  # details (info) of the adapters that became Ready last
DETAIL_MESSAGE_MAX = 512  # characters of a detail's message (the full one is in the worker's log)
ID_SETS = {"Ready": "readyIds", "Failed": "failedIds", "Loading": "loadingIds"}
MERGE = "application/merge-patch+json"


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _kind(state: str) -> str:
    return state if state in ("Ready", "Failed") else "Loading"


def _is_exception(detail: dict[str, Any] | None) -> bool:
    return detail is not None and detail.get("state") != "Ready"


def detail_of(rep: WorkerAdapterReport) -> dict[str, Any]:
    out = rep.model_dump(exclude_none=True, exclude={"id", "onDevice"})
    if rep.message:
        out["message"] = rep.message[:DETAIL_MESSAGE_MAX]
    return out


class WorkerReport:
    """Owns one LoRAWorker object. ``mark_dirty(id)`` after a change of that adapter (``mark_dirty()``:
    look at every adapter again); ``run()`` writes in batches.

    ``lookup`` returns one adapter's report (None: the worker no longer has it) and ``known_ids`` the
    IDs it has; ``on_device`` (optional, from the engine) returns the IDs in device slots now (None: the
    engine has not started, and the status says nothing of the device yet);
    ``cache_bytes_used`` the cache's bytes in use.
    """

    def __init__(
        self,
        api: KubeClient,
        *,
        name: str,
        namespace: str,
        spec: LoRAWorkerSpec,
        lookup: Callable[[int], WorkerAdapterReport | None],
        known_ids: Callable[[], Iterable[int]],
        cache_bytes_used: Callable[[], int] = lambda: 0,
        assigned: Callable[[], int] | None = None,
        waiting: Callable[[], dict[int, int]] | None = None,
        on_device: Callable[[], set[int] | None] | None = None,
        throttled: Callable[[], set[int]] | None = None,
        pod_name: str = "",
        batch_seconds: float = 0.2,
        heartbeat_seconds: float = 10.0,
    ) -> None:
        self.api = api
        self.name, self.namespace = name, namespace
        self.spec = spec
        self.lookup = lookup
        self.known_ids = known_ids
        self.cache_bytes_used = cache_bytes_used
        self.assigned = assigned
        self.waiting = waiting
        self.on_device = on_device
        self.throttled = throttled  # IDs refused over their limits lately (api/limits.py)
        self._throttled: set[int] = set()
        self.pod_name = pod_name
        self.batch_seconds = batch_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.writes = 0  # status writes done (tests check batching with it)
        self.bytes_written = 0  # bytes of status bodies sent (tests check that writes are O(changes))
        self._dirty = asyncio.Event()
        self._dirty_ids: set[int] = set()
        self._dirty_all = True
        # What the object says (or will say once the pending parts are written).
        self._state: dict[int, str] = {}  # id -> Ready / Failed / Loading
        self._members: dict[str, dict[str, set[int]]] = {k: {} for k in ID_SETS}  # kind -> block -> ids
        self._details: dict[int, dict[str, Any]] = {}
        self._exceptions = 0  # details that are exceptions (not the recent Ready ones)
        self._overflow: OrderedDict[int, dict[str, Any]] = OrderedDict()  # exceptions without room
        self._recent: OrderedDict[int, None] = OrderedDict()  # Ready IDs with a detail, oldest first
        self._device: set[int] = set()
        self._sent_waiting: set[str] = set()
        self._pending_blocks: set[tuple[str, str]] = set()
        self._pending_details: set[int] = set()
        self._full = True  # the next write replaces the whole status
        self._created = False
        self._owned = False  # the object had an ownerReference to our Pod
        self.pod_gone = False  # the Pod was deleted: this worker is going away; stop reporting

    @property
    def path(self) -> str:
        return f"/apis/{API_VERSION}/namespaces/{self.namespace}/{WORKER_PLURAL}/{self.name}"

    def mark_dirty(self, adapter_id: int | None = None) -> None:
        if adapter_id is None:
            self._dirty_all = True
        else:
            self._dirty_ids.add(adapter_id)
        self._dirty.set()

    # --- the object ------------------------------------------------------------------------------
    async def _owner_references(self) -> list[dict[str, Any]] | None:
        if not self.pod_name:
            return None
        try:
            pod = await self.api.request("GET", f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}")
        except APIError as e:
            if e.status in (403, 404):
                # No Pod (a local run) or no permission to read it: the heartbeat window covers it.
                log.info(
                    "pod %s/%s not readable (%s); LoRAWorker has no owner", self.namespace, self.pod_name, e
                )
                return None
            raise
        meta = pod.get("metadata") or {}
        return [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta.get("name", self.pod_name),
                "uid": meta.get("uid", ""),
                "blockOwnerDeletion": False,
                "controller": False,
            }
        ]

    async def ensure_object(self) -> None:
        """Create this worker's LoRAWorker, or update the spec and owner of the one already there."""
        owners = await self._owner_references()
        body: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": WORKER_KIND,
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {"loraplane.io/base-model": _label(self.spec.baseModel)},
            },
            "spec": self.spec.model_dump(exclude_none=True),
        }
        if owners:
            body["metadata"]["ownerReferences"] = owners
        self._owned = bool(owners)
        base = f"/apis/{API_VERSION}/namespaces/{self.namespace}/{WORKER_PLURAL}"
        try:
            await self.api.request("POST", base, body=body)
        except APIConflictError:  # it exists already (AlreadyExists): take it over
            patch = {
                "metadata": {"labels": body["metadata"]["labels"], "ownerReferences": owners},
                "spec": body["spec"],
            }
            await self.api.request("PATCH", self.path, body=patch, content_type=MERGE)
        self._created = True
        self._full = True
        log.info("LoRAWorker %s/%s ready to report", self.namespace, self.name)

    # --- the compact state -----------------------------------------------------------------------
    def _absorb(self) -> None:
        """Bring the compact state up to date with the adapters marked dirty; note what to write."""
        if self._dirty_all:
            ids = set(self.known_ids()) | set(self._state)
            self._dirty_all = False
            self._dirty_ids.clear()
        else:
            ids, self._dirty_ids = self._dirty_ids, set()
        for i in ids:
            self._update(i, self.lookup(i))
        if self.on_device is not None:
            device = self.on_device() or set()
            if device != self._device:
                self._device = device
        if self.throttled is not None:
            self._throttled = self.throttled()

    def _update(self, i: int, rep: WorkerAdapterReport | None) -> None:
        kind = _kind(rep.state) if rep is not None else None
        old = self._state.get(i)
        if kind != old:
            block = ranges.block_of(i)
            if old is not None:
                self._members[old][block].discard(i)
                self._pending_blocks.add((old, block))
            if kind is not None:
                self._members[kind].setdefault(block, set()).add(i)
                self._pending_blocks.add((kind, block))
                self._state[i] = kind
            else:
                self._state.pop(i, None)
        exception = rep is not None and (kind == "Failed" or (kind == "Loading" and rep.reason is not None))
        fresh_ready = rep is not None and kind == "Ready" and (rep.info is not None or rep.message)
        if exception:
            self._recent.pop(i, None)
            self._set_exception(i, detail_of(rep))  # type: ignore[arg-type]
        elif fresh_ready:
            self._overflow.pop(i, None)
            if i not in self._recent or old != "Ready":
                self._recent[i] = None
                self._set_detail(i, detail_of(rep))  # type: ignore[arg-type]
            while len(self._recent) > RECENT_READY:
                gone, _ = self._recent.popitem(last=False)
                self._set_detail(gone, None)
        else:
            self._overflow.pop(i, None)
            self._recent.pop(i, None)
            self._set_detail(i, None)

    def _set_exception(self, i: int, detail: dict[str, Any]) -> None:
        self._overflow.pop(i, None)
        if _is_exception(self._details.get(i)) or self._exceptions < MAX_EXCEPTIONS:
            self._set_detail(i, detail)
        else:
            self._overflow[i] = detail  # its state is in the ID sets; the detail waits for room
            self._set_detail(i, None)

    def _set_detail(self, i: int, detail: dict[str, Any] | None) -> None:
        old = self._details.get(i)
        if old == detail:
            return
        if detail is None:
            self._details.pop(i, None)
        else:
            self._details[i] = detail
        self._exceptions += _is_exception(detail) - _is_exception(old)
        self._pending_details.add(i)
        while self._overflow and self._exceptions < MAX_EXCEPTIONS:
            j, waiting = self._overflow.popitem(last=False)
            self._set_detail(j, waiting)

    def _counts(self) -> dict[str, Any]:
        counts = {
            "heartbeatTime": now(),
            "ready": sum(map(len, self._members["Ready"].values())),
            "failed": sum(map(len, self._members["Failed"].values())),
            "loading": sum(map(len, self._members["Loading"].values())),
            "cacheBytesUsed": self.cache_bytes_used(),
        }
        if self.assigned is not None:
            counts["assigned"] = self.assigned()
        if self.waiting is not None:
            counts["waiting"] = self._waiting()
        if self.on_device is not None and self.on_device() is not None:  # None: no engine yet
            counts["onDevice"] = sum(1 for i in self._device if i in self._state)
            counts["onDeviceIds"] = ranges.encode(self._device) or None
        if self.throttled is not None:
            counts["throttledIds"] = ranges.encode(self._throttled) or None
        return counts

    def _waiting(self) -> dict[str, int] | None:
        """Requests waiting per adapter ID, for the MAX_WAITING adapters with the most (None: none waits).
        A merge patch replaces the whole map (it is small), so it is sent whole, with nulls for the IDs
        it no longer names."""
        top = sorted(((n, i) for i, n in self.waiting().items() if n > 0), reverse=True)[:MAX_WAITING]  # type: ignore[misc]
        now = {str(i): n for n, i in top}
        out: dict[str, Any] = dict.fromkeys(self._sent_waiting - now.keys()) | now
        self._sent_waiting = set(now)
        return out or None

    def status_body(self) -> dict[str, Any]:
        """The whole status, as the first write sends it."""
        status = {k: v for k, v in self._counts().items() if v is not None}
        if "waiting" in status:
            status["waiting"] = {i: n for i, n in status["waiting"].items() if n is not None}
        for kind, field in ID_SETS.items():
            blocks = sorted(self._members[kind].items(), key=lambda kv: int(kv[0]))
            status[field] = {b: ranges.encode(ids) for b, ids in blocks if ids}
        status["adapters"] = {str(i): d for i, d in sorted(self._details.items())}
        return status

    def delta_body(self) -> dict[str, Any]:
        """A merge patch of what changed since the last write (null removes a block or a detail)."""
        status: dict[str, Any] = self._counts()
        for kind, block in self._pending_blocks:
            ids = self._members[kind].get(block)
            status.setdefault(ID_SETS[kind], {})[block] = ranges.encode(ids) if ids else None
        if self._pending_details:
            status["adapters"] = {str(i): self._details.get(i) for i in sorted(self._pending_details)}
        return status

    async def write_status(self) -> None:
        """One write: the whole status the first time, then a merge patch of what changed."""
        self._absorb()
        for _ in range(2):
            try:
                if self._full:
                    body: Any = [{"op": "add", "path": "/status", "value": self.status_body()}]
                    kind = "application/json-patch+json"
                else:
                    body, kind = {"status": self.delta_body()}, MERGE
                await self.api.request("PATCH", self.path + "/status", body=body, content_type=kind)
                break
            except APINotFoundError:
                if self._owned and await self._owner_references() is None:
                    # Our Pod is gone and the garbage collector took our report with it: recreating it
                    # would only leave an orphan behind; the Pod's deletion will stop this process.
                    log.warning("pod %s/%s is gone; no longer reporting", self.namespace, self.pod_name)
                    self.pod_gone = True
                    return
                log.warning("LoRAWorker %s/%s is gone; recreating it", self.namespace, self.name)
                await self.ensure_object()
        self._full = False
        self._pending_blocks.clear()
        self._pending_details.clear()
        self.writes += 1
        self.bytes_written += len(json.dumps(body))
        STATUS_WRITES.inc()

    async def delete(self) -> None:
        """Remove the object on a clean shutdown, so the operator stops counting this worker at once."""
        if self.pod_gone:
            return
        try:
            await self.api.request("DELETE", self.path, timeout=5)
        except APINotFoundError:
            pass
        except APIError as e:
            log.warning("could not delete LoRAWorker %s/%s: %s", self.namespace, self.name, e)

    async def _changed_before_heartbeat(self) -> bool:
        """Wait for mark_dirty() or for the engine's device slots to move (the engine swaps slots on
        its own thread, so they are polled); False when the heartbeat is due first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.heartbeat_seconds
        while (left := deadline - loop.time()) > 0:
            try:
                await asyncio.wait_for(self._dirty.wait(), timeout=min(left, DEVICE_POLL_SECONDS))
                return True
            except TimeoutError:
                if self.on_device is not None and (self.on_device() or set()) != self._device:
                    return True
                if self.throttled is not None and self.throttled() != self._throttled:
                    return True
        return False

    # --- the loop --------------------------------------------------------------------------------
    async def run(self) -> None:
        """Create the object, then write status on changes (batched) and on every heartbeat."""
        backoff = Backoff()
        loop = asyncio.get_running_loop()
        last_write = -self.batch_seconds
        while not self.pod_gone:
            try:
                if not self._created:
                    await self.ensure_object()
                self._dirty.clear()
                await self.write_status()
                last_write = loop.time()
                backoff.reset()
            except APIError as e:
                wait = backoff.next()
                log.warning(
                    "LoRAWorker %s/%s write failed (%s); retrying in %.1fs",
                    self.namespace,
                    self.name,
                    e,
                    wait,
                )
                await asyncio.sleep(wait)
                continue
            if not await self._changed_before_heartbeat():
                continue  # heartbeat
            # At most one write per batch interval. A change after a quiet spell is written after a
            # short settle (a small local adapter goes Pending -> Ready within it: one write, not two);
            # a burst of changes is coalesced into the write at the end of the interval.
            settle = self.batch_seconds * SETTLE_FRACTION
            await asyncio.sleep(max(settle, last_write + self.batch_seconds - loop.time()))
        await asyncio.Event().wait()  # nothing more to report; wait to be stopped


def _label(value: str) -> str:
    """A label-safe form of a base model name (labels allow [A-Za-z0-9._-], at most 63 characters)."""
    out = "".join(c if c.isalnum() or c in "._-" else "_" for c in value)[-63:].strip("._-")
    return out or "unknown"


def status_of(reports: Iterable[WorkerAdapterReport], on_device: set[int] | None = None) -> dict[str, Any]:
    """The status a worker with these reports writes (for tools and tests that stand in for a worker)."""
    by_id = {r.id: r for r in reports}
    report = WorkerReport(
        None,  # type: ignore[arg-type]
        name="",
        namespace="",
        spec=None,  # type: ignore[arg-type]
        lookup=by_id.get,
        known_ids=lambda: by_id,
        on_device=None if on_device is None else lambda: on_device,
    )
    report._absorb()
    return report.status_body()
