"""The operator's caches and the one path that writes adapter status (resourceVersion-checked).

The operator keeps every adapter and LoRAWorker it watches in memory (fed by kopf's watch events, primed
by a LIST at startup), so name ownership and worker aggregation are computed without extra reads. It
gathers the inputs of an adapter's status (ID decision, name holder, workers' aggregate) and status.py
computes it; every write is a PUT to /status carrying the resourceVersion the status was computed
from: a 409 means the view was stale (another replica, a spec change), so it re-reads and recomputes.
The ID, its version digest, servedName, conditions and phase travel in that one write; events.py says
what changed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import zlib
from typing import Any

from loraplane.crds import conditions as cond
from loraplane.crds.models import (
    ADAPTER_PLURAL,
    GROUP,
    VERSION,
    WORKER_PLURAL,
    parse_adapter,
    version_of,
)
from loraplane.errors import APIConflictError, APIError, APINotFoundError, PermanentError
from loraplane.kube import KubeClient, rv_behind
from loraplane.operator import aggregate as agg_mod
from loraplane.operator import allocation, events, metrics, placement
from loraplane.operator import status as status_mod
from loraplane.operator.names import Claim, Key, NameIndex
from loraplane.operator.settings import OperatorSettings

log = logging.getLogger("loraplane.operator")
PLACEMENT_MESSAGE_MAX = 1024  # status.placement.message's schema limit (many full workers are named)


def ref_of(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', '')}/{meta.get('name', '')}"


def uid_of(obj: dict[str, Any] | None) -> str | None:
    return ((obj or {}).get("metadata") or {}).get("uid")


def ids_in(obj: dict[str, Any]) -> list[int]:
    """An adapter's current and previous ID."""
    status = obj.get("status") or {}
    return [i for i in (status.get("id"), status.get("previousId")) if isinstance(i, int)]


def _name_key(obj: dict[str, Any]) -> Key | None:
    spec = obj.get("spec") or {}
    base, served = spec.get("baseModel"), spec.get("name") or (obj.get("metadata") or {}).get("name")
    if not isinstance(base, str) or not isinstance(served, str):
        return None
    return (base, served)


class Reconciler:
    """The operator's state and the one path that writes adapter status."""

    def __init__(self, settings: OperatorSettings, api: KubeClient) -> None:
        self.settings = settings
        self.api = api
        self.adapters: dict[str, dict[str, Any]] = {}
        self.workers: dict[str, agg_mod.WorkerView] = {}
        self.names = NameIndex()
        self._holders: dict[Key, str | None] = {}
        self._seen_max = 0  # Highest ID seen anywhere since start, deleted objects included.
        self._rv_seen: str | None = None  # Highest resourceVersion the server has sent us.
        self._unserved = False  # The LoRAAdapter CRD was not served when kopf last started.
        self.allocator = allocation.Allocator(api, settings, lambda: self._seen_max)
        self._locks: dict[str, asyncio.Lock] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.events = events.EventPoster(api, os.environ.get("HOSTNAME") or f"pid-{os.getpid()}")
        self._deferred: set[str] = set()
        self._live: dict[str, bool] = {}  # worker ref -> live when last looked at
        self._by_id: dict[int, str] = {}  # adapter ID (current or previous) -> adapter ref
        self._ids_of: dict[str, list[int]] = {}  # adapter ref -> the IDs it is indexed under
        self._wrote: dict[str, int] = {}  # adapter ref -> resourceVersion of our last status write
        self._due: set[str] = set()  # adapters whose reports changed, recomputed at the window's end
        self._flusher: asyncio.Task[None] | None = None
        self.loads = placement.Loads()  # adapters placed per worker, from status.placement
        self.demand = placement.Demand(
            settings.demand_waiting, settings.demand_up_seconds, settings.demand_down_seconds
        )
        self._extra: dict[str, int] = {}  # adapter ref -> replicas added by demand
        self._defaults: dict[str, int] = {}  # base model -> the pool's default replicas (live workers)
        self._joined: dict[
            str, set[str]
        ] = {}  # adapter ref -> workers that came and rank in its top replicas
        self._short: dict[str, dict[str, None]] = {}  # base model -> adapters placed on fewer than replicas
        self._phases: dict[str, int] = {}  # phase -> adapters in it, and the adapters waiting for an ID:
        self._no_id: set[str] = set()  # kept as the cache changes, so a tick does not scan every adapter

    # ---- caches ----------------------------------------------------------------------------------

    def _observe(self, obj: dict[str, Any]) -> None:
        self._saw_rv((obj.get("metadata") or {}).get("resourceVersion"))
        for i in ids_in(obj):
            self._seen_max = max(self._seen_max, i)

    def _scope_paths(self, plural: str) -> list[str]:
        if not self.settings.namespaces:
            return [f"/apis/{GROUP}/{VERSION}/{plural}"]
        return [f"/apis/{GROUP}/{VERSION}/namespaces/{ns}/{plural}" for ns in self.settings.namespaces]

    async def prime(self) -> None:
        """LIST adapters and workers before the watch starts, so the first decisions see everything.

        Run again whenever kopf starts again (after the API server went away): the caches are rebuilt
        from what the server has now, while the highest ID ever seen is kept (the ledger guard)."""
        adapters: list[dict[str, Any]] = []
        workers: dict[str, agg_mod.WorkerView] = {}
        self._unserved = False
        for plural in (ADAPTER_PLURAL, WORKER_PLURAL):
            for path in self._scope_paths(plural):
                try:
                    body = await self.api.request("GET", path)
                except APINotFoundError:  # A CRD is not installed (yet): kopf waits for it.
                    log.warning("%s: not served by the API server (is the CRD installed?)", path)
                    self._unserved |= plural == ADAPTER_PLURAL
                    continue
                self._saw_rv((body.get("metadata") or {}).get("resourceVersion"))
                for obj in body.get("items") or []:
                    self._observe(obj)
                    if plural == ADAPTER_PLURAL:
                        adapters.append(obj)
                    elif (view := agg_mod.worker_view(obj)[0]) is not None:
                        self._seen_max = max(self._seen_max, view.max_id)
                        workers[view.ref] = view
        self.adapters, self.workers, self.names, self._holders = {}, workers, NameIndex(), {}
        self._phases, self._no_id = {}, set()
        self._by_id, self._ids_of, self._wrote = {}, {}, {}  # a replaced store may reuse versions
        self.loads, self._extra, self._short = placement.Loads(), {}, {}
        now, window = time.time(), self.settings.heartbeat_window
        self._live = {ref: w.live(now, window) for ref, w in workers.items()}
        for obj in adapters:
            self._remember_adapter(obj)
        self._defaults = {m: self._pool_default(m) for m in {w.base_model for w in workers.values()}}
        for key in list(self.names._claims):
            holder = self.names.holder(key)
            self._holders[key] = holder.ref if holder else None
        log.info(
            "primed: %d adapters, %d workers, highest visible ID %d",
            len(self.adapters),
            len(self.workers),
            self._seen_max,
        )

    def _cache(self, ref: str, obj: dict[str, Any] | None) -> dict[str, Any]:
        """Put (None: drop) an adapter in the cache, keeping the phase counts and the ID waiters."""
        old = self.adapters.pop(ref, None)
        if old is not None:
            phase = _phase(old)
            self._phases[phase] -= 1
            self._no_id.discard(ref)
        if obj is None:
            return {}
        self.adapters[ref] = obj
        phase = _phase(obj)
        self._phases[phase] = self._phases.get(phase, 0) + 1
        if _needs_id(obj):
            self._no_id.add(ref)
        return obj

    def _saw_rv(self, rv: Any) -> None:
        if rv and (self._rv_seen is None or rv_behind(self._rv_seen, str(rv))):
            self._rv_seen = str(rv)

    async def store_went_back(self) -> bool:
        """True when the server's resourceVersion is below one it sent us: its store was replaced (an
        API server that came back empty, an etcd restore). kopf would resume its watches from versions
        the server never issues, so main.py starts kopf again (it lists afresh). Also True when the
        LoRAAdapter CRD went away or came back: kopf resolves resources only when it starts.

        The comparison is with the highest version seen *before* the GET was sent: handlers and watch
        events raise ``_rv_seen`` while the GET is in flight, past the version it reads (issue 18: 14
        false alarms in three replicas under load on kube-apiserver, each restarting kopf)."""
        seen = self._rv_seen
        try:
            current = await self.api.resource_version(self._scope_paths(ADAPTER_PLURAL)[0])
        except APINotFoundError:
            if self._unserved:
                return False  # Still not there: kopf waits, and so does this check.
            log.warning("LoRAAdapters are not served any more (the CRD is gone); watching again")
            return True
        if self._unserved:
            log.info("LoRAAdapters are served now; watching them")
            return True
        if seen is None or not rv_behind(current, seen):
            return False
        log.warning(
            "the API server's resourceVersion %s is below %s, which it sent earlier: its store was replaced; "
            "listing everything again (IDs up to %d stay retired)",
            current,
            seen,
            self._seen_max,
        )
        self._rv_seen = None
        return True

    def _remember_adapter(self, obj: dict[str, Any]) -> set[Key]:
        ref = ref_of(obj)
        self._observe(obj)
        obj = self._cache(ref, slim(obj))
        self._index(ref, ids_in(obj))
        self._remember_placement(ref, obj)
        key = _name_key(obj)
        if key is None:
            return self.names.release(ref)
        meta = obj["metadata"]
        return self.names.claim(
            key, Claim(meta.get("creationTimestamp", ""), meta["namespace"], meta["name"])
        )

    # ---- events ----------------------------------------------------------------------------------

    async def on_adapter(self, event_type: str | None, obj: dict[str, Any]) -> None:
        ref = ref_of(obj)
        if event_type == "DELETED":
            self._observe(obj)
            current = self.adapters.get(ref)
            if current is not None and uid_of(current) != uid_of(obj):
                return  # Already recreated under the same name.
            self._cache(ref, None)
            self._locks.pop(ref, None)
            self._wrote.pop(ref, None)
            self._index(ref, [])
            freed = self.loads.placed_on(ref)
            base = (obj.get("spec") or {}).get("baseModel", "")
            self._mark_short(ref, base, False)
            self.loads.drop(ref)
            self.loads.know_size(ref, None)
            self.demand.forget(ref)
            self._extra.pop(ref, None)
            self._joined.pop(ref, None)
            touched = self.names.release(ref)
            await self._handover(touched, deleted=ref)
            if freed:  # room on its workers: adapters short of replicas in that pool may take it
                await self._fill(base, len(freed))
            return
        current = self.adapters.get(ref)
        if current is not None and uid_of(current) == uid_of(obj):
            if _rv(obj) <= self._wrote.get(ref, -1):
                return  # The echo of our own status write (or older): its reconcile is done.
            if _newer(current, obj):
                obj = current  # Our own write's answer is newer than this event.
        touched = self._remember_adapter(obj)
        await self.reconcile(ref)
        await self._handover(touched, deleted=None, skip=ref)

    async def _handover(self, keys: set[Key], deleted: str | None, skip: str | None = None) -> None:
        """Re-reconcile the claimants of every name whose holder changed."""
        jobs = []
        for key in keys:
            holder = self.names.holder(key)
            new = holder.ref if holder else None
            if self._holders.get(key) == new:
                continue
            old = self._holders.get(key)
            self._holders[key] = new
            if new is None:
                self._holders.pop(key, None)
            if deleted and old == deleted and new:
                log.info(
                    "served name %r of %s handed over from %s (deleted) to %s", key[1], key[0], deleted, new
                )
            jobs += [self.reconcile(c.ref) for c in self.names.claimants(key) if c.ref != skip]
        if jobs:
            await asyncio.gather(*jobs)

    def _index(self, ref: str, ids: list[int]) -> None:
        """Index the adapter ``ref`` under ``ids`` (its current and previous ID) only."""
        for i in self._ids_of.pop(ref, []):
            if self._by_id.get(i) == ref:
                del self._by_id[i]
        if ids:
            self._ids_of[ref] = ids
            for i in ids:
                self._by_id[i] = ref

    async def on_worker(self, event_type: str | None, obj: dict[str, Any]) -> None:
        ref = ref_of(obj)
        self._saw_rv((obj.get("metadata") or {}).get("resourceVersion"))
        old = self.workers.get(ref)
        old_model = old.base_model if old is not None else None
        changed: set[int]
        if event_type == "DELETED":
            self.workers.pop(ref, None)
            view, changed = None, set()
        else:
            view, changed = agg_mod.worker_view(obj, old)
            if view is not None:
                self._seen_max = max(self._seen_max, view.max_id)
                if old is not None and old.pod_name == view.pod_name:
                    view.pod_alive = old.pod_alive
                elif view.pod_name:
                    view.pod_alive = await self._pod_exists(view.namespace, view.pod_name)
                self.workers[ref] = view
            else:
                self.workers.pop(ref, None)
        await self._worker_changed(ref, old_model, view, changed)

    async def _worker_changed(
        self,
        ref: str,
        old_model: str | None,
        new: agg_mod.WorkerView | None,
        changed: set[int],
    ) -> None:
        """Reconcile what a worker's change can move: every adapter of its base model when the worker
        came, went, or its liveness flipped (the counts' total moves); otherwise only the adapters whose
        report changed. A heartbeat alone touches no adapter."""
        live = new is not None and new.live(time.time(), self.settings.heartbeat_window)
        was_live = self._live.get(ref, False)
        if new is None:
            self._live.pop(ref, None)
        else:
            self._live[ref] = live
        moved = old_model is None or new is None or old_model != new.base_model
        models = {m for m in (old_model, new.base_model if new else None) if m}
        defaults = {m: self._pool_default(m) for m in models}
        if any(self._defaults.get(m, 0) != d for m, d in defaults.items()):
            self._defaults.update(defaults)  # the pool's default replicas changed: every adapter may move
            self._in_background(
                [r for r, o in self.adapters.items() if (o.get("spec") or {}).get("baseModel") in models]
            )
            return
        if live != was_live or (moved and (live or was_live)):
            # Adapters on every worker (no placement) count this one in their total; placed ones move
            # only if they were on it, or it joined and ranks in their top replicas (about 1/W of them).
            joined = ref if live else None
            refs = [
                r
                for r, o in self.adapters.items()
                if (o.get("spec") or {}).get("baseModel") in models and _touched_by(o, ref, joined)
            ]
            if joined is not None:
                for r in refs:
                    self._joined.setdefault(r, set()).add(joined)
            self._in_background(refs)
            return
        if not live:
            return
        self._due |= {due for i in changed if (due := self._by_id.get(i)) is not None}
        if self._due and (self._flusher is None or self._flusher.done()):
            self._flusher = asyncio.get_running_loop().create_task(self._flush_later())

    def _in_background(self, refs: list[str]) -> None:
        """Reconcile ``refs`` (a worker came or went) in a task, so the worker's next events, its
        heartbeats above all, are not held up behind hundreds of status writes: held up longer than the
        heartbeat window, the worker would look dead to the next periodic check and its adapters move."""
        if not refs:
            return
        metrics.RECONCILES.labels(trigger="worker").inc(len(refs))

        async def run() -> None:
            try:
                await asyncio.gather(*(self.reconcile(r, counted=True) for r in refs))
            except Exception:  # A background task: log; the adapters' next event or the tick retries.
                log.exception("recomputing adapters after a worker came or went failed")

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def idle(self) -> None:
        """Wait until the background reconciles started so far are done (tests, shutdown)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _flush_later(self) -> None:
        await asyncio.sleep(self.settings.report_window)
        try:
            await self.flush()
        except Exception:  # A background task: log; the adapters' next event or the tick retries.
            log.exception("recomputing adapters after worker reports failed")

    async def flush(self) -> None:
        """Recompute now the adapters whose workers' reports changed since the last flush."""
        refs, self._due = self._due, set()
        if refs:
            metrics.RECONCILES.labels(trigger="worker").inc(len(refs))
            await asyncio.gather(*(self.reconcile(r, counted=True) for r in refs))

    async def _pod_exists(self, namespace: str, pod: str) -> bool:
        try:
            await self.api.request("GET", f"/api/v1/namespaces/{namespace}/pods/{pod}")
        except APINotFoundError:
            return False
        except APIError as exc:
            if not exc.retry:
                raise
            return True  # Unknown: keep counting rather than flap on a network blip.
        return True

    async def tick(self) -> None:
        """Periodic: pods and heartbeats of workers, adapters waiting for an ID, the phase gauge."""
        for ref, view in list(self.workers.items()):
            if view.pod_name:
                view.pod_alive = await self._pod_exists(view.namespace, view.pod_name)
            if self.workers.get(ref) is view:
                await self._worker_changed(ref, view.base_model, view, set())
        if self._no_id:
            metrics.RECONCILES.labels(trigger="tick").inc(len(self._no_id))
            await asyncio.gather(*(self.reconcile(r, counted=True) for r in list(self._no_id)))
        await self._scale_by_demand()
        metrics.set_phase_counts(self._phases)
        now, window = time.time(), self.settings.heartbeat_window
        metrics.set_tick(
            waiting_for_id=len(self._no_id),
            workers=[(w.base_model, w.live(now, window)) for w in self.workers.values()],
        )

    # ---- the write -------------------------------------------------------------------------------

    def _mine(self, obj: dict[str, Any]) -> bool:
        count = self.settings.shard_count
        return count <= 1 or zlib.crc32((uid_of(obj) or "").encode()) % count == self.settings.shard_index

    async def reconcile(self, ref: str, *, deferred: bool = False, counted: bool = False) -> None:
        if not counted and not deferred:
            metrics.RECONCILES.labels(trigger="adapter").inc()
        obj = self.adapters.get(ref)
        if obj is not None and not deferred and not self._mine(obj):
            # Another replica's share: act only if it has not done so after the grace period.
            if ref not in self._deferred:
                self._deferred.add(ref)
                task = asyncio.get_running_loop().create_task(self._later(ref))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            return
        lock = self._locks.setdefault(ref, asyncio.Lock())
        async with lock:
            for _ in range(self.settings.write_retries):
                obj = self.adapters.get(ref)
                if obj is None:
                    return
                old = obj.get("status") or {}
                new, taken = await self.desired(obj)
                if new == old:
                    return
                ns, name = ref.split("/", 1)
                body = {**obj, "status": new}  # metadata carries the resourceVersion: a checked write.
                try:
                    result = await self.api.request("PUT", adapter_path(ns, name, "status"), body=body)
                except APIConflictError:
                    if taken is not None:
                        self.allocator.give_back(taken)  # A 409 proves it was never written.
                    metrics.ALLOCATION_CONFLICTS.inc()
                    if not await self._reread(ref, obj):
                        return
                    continue
                except APINotFoundError:
                    return
                except APIError as exc:
                    if exc.retry:
                        log.warning(
                            "adapter %s: status write failed, will retry on the next event: %s", ref, exc
                        )
                    else:
                        log.error("adapter %s: status write rejected: %s", ref, exc)
                    return
                current = self.adapters.get(ref)
                if current is None or uid_of(current) == uid_of(result):
                    self._cache(ref, slim(result))
                    self._index(ref, ids_in(result))
                    self._wrote[ref] = _rv(result)
                self._observe(result)
                if taken is not None:
                    metrics.IDS_ASSIGNED.inc()
                note = events.transition(old, new)
                if note is not None:
                    log.info("adapter %s: %s (%s)", ref, note.message, note.reason)
                    self.events.post(result, note)
                return
            log.warning("adapter %s: status kept changing under this operator; will retry", ref)

    async def _later(self, ref: str) -> None:
        await asyncio.sleep(self.settings.shard_grace)
        self._deferred.discard(ref)
        try:
            await self.reconcile(ref, deferred=True)
        except Exception:  # A background task: log, the next event or tick retries.
            log.exception("adapter %s: deferred reconcile failed", ref)

    async def _reread(self, ref: str, stale: dict[str, Any]) -> bool:
        ns, name = ref.split("/", 1)
        try:
            fresh = await self.api.request("GET", adapter_path(ns, name))
        except APINotFoundError:
            return False
        self._remember_adapter(fresh)  # Same object newer, or recreated under the same name.
        self._observe(fresh)
        return True

    async def desired(self, obj: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
        """The status this adapter should have, and the fresh ID taken for it (None if none was taken)."""
        try:
            adapter = parse_adapter(obj)
        except PermanentError as exc:
            return status_mod.invalid(obj, exc), None
        spec, current = adapter.spec, adapter.status
        version = version_of(spec.path, spec.revision, spec.digest)
        decision = allocation.decide(current, version)
        ids = status_mod.IdState(current.id if current else None, version, decision.previous_id)
        taken: int | None = None
        if not decision.keep:
            try:
                taken = await self.allocator.take()
            except allocation.LedgerError as exc:
                ids = status_mod.IdState(None, version, waiting=exc)
            else:
                ids = status_mod.IdState(taken, version, decision.previous_id)
        holder = self.names.holder((spec.baseModel, adapter.served_name))
        other = holder.ref if holder is not None and holder.ref != ref_of(obj) else None
        agg, placed, placed_ready = None, None, 0
        if ids.id is not None:
            if other is None:
                placed, placed_ready = self._place(ref_of(obj), obj, spec.replicas, spec.baseModel, ids.id)
            else:
                self.loads.drop(ref_of(obj))  # not served under a taken name: placed nowhere
                self._mark_short(ref_of(obj), spec.baseModel, False)
            prior = current.previousId if current else None
            if taken is not None and decision.previous_id is not None:
                prior = decision.previous_id
            agg = agg_mod.aggregate(
                ids.id,
                prior,
                spec.baseModel,
                list(self.workers.values()),
                time.time(),
                self.settings.heartbeat_window,
                only=None if placed is None else {*placed["workers"], *(placed.get("draining") or ())},
            )
        return status_mod.desired(obj, adapter, ids, other, agg, placed, placed_ready), taken

    # ---- placement -------------------------------------------------------------------------------

    def _pool(self, base_model: str) -> list[agg_mod.WorkerView]:
        now, window = time.time(), self.settings.heartbeat_window
        return [w for w in self.workers.values() if w.base_model == base_model and w.live(now, window)]

    def _pool_default(self, base_model: str) -> int:
        return max((w.default_replicas for w in self._pool(base_model)), default=0)

    def _remember_placement(self, ref: str, obj: dict[str, Any]) -> None:
        status = obj.get("status") or {}
        self.loads.know_size(ref, (status.get("adapter") or {}).get("sizeBytes"))
        placed = status.get("placement")
        if isinstance(placed, dict):
            self.loads.set(ref, placed.get("workers") or (), self.loads.size_of(ref))
        else:
            self.loads.drop(ref)
        self._mark_short(ref, (obj.get("spec") or {}).get("baseModel", ""), _short(obj))

    def _mark_short(self, ref: str, base_model: str, short: bool) -> None:
        """Keep the index of adapters short of replicas per pool (what room freed there is for)."""
        if short:
            self._short.setdefault(base_model, {})[ref] = None
        elif (refs := self._short.get(base_model)) is not None:
            refs.pop(ref, None)
            if not refs:
                del self._short[base_model]

    async def _fill(self, base_model: str, room: int) -> None:
        """``room`` placements were freed in ``base_model``'s pool: the adapters short of replicas there
        take it, the longest short first, until it is used. Not a scan of the catalogue: a pool with room
        has none short, so a delete usually costs nothing here."""
        for ref in list(self._short.get(base_model, ())):
            if room <= 0:
                return
            before = len(self.loads.placed_on(ref))
            metrics.RECONCILES.labels(trigger="worker").inc()
            await self.reconcile(ref, counted=True)
            room -= len(self.loads.placed_on(ref)) - before

    def _replicas(self, spec_replicas: int | None, base_model: str) -> int:
        if spec_replicas is not None:
            return spec_replicas
        return self._defaults.get(base_model, 0)

    def _place(
        self, ref: str, obj: dict[str, Any], spec_replicas: int | None, base_model: str, adapter_id: int
    ) -> tuple[dict[str, Any] | None, int]:
        """status.placement for one adapter (None: on every worker), its workers held in ``loads``, and
        how many of them have it Ready (draining ones not counted)."""
        base = self._replicas(spec_replicas, base_model)
        if base == 0:
            self.loads.drop(ref)
            self._extra.pop(ref, None)
            self._joined.pop(ref, None)
            self._mark_short(ref, base_model, False)
            return None, 0
        pool = self._pool(base_model)
        old = (obj.get("status") or {}).get("placement") or {}
        if ref not in self._extra and old.get("replicas", 0) > base:
            self._extra[ref] = old["replicas"] - base  # added by demand before a restart
        limit = max(base, max((w.max_replicas for w in pool), default=0))
        replicas = min(base + self._extra.get(ref, 0), limit)
        by_ref = {w.ref: w for w in pool}
        decision = placement.place(
            ref,
            uid_of(obj) or ref,
            replicas,
            {w.ref: placement.Capacity(w.max_adapters, w.cache_bytes) for w in pool},
            self.loads,
            joined=self._joined.pop(ref, ()),
        )
        self.loads.set(ref, decision.workers, self.loads.size_of(ref))
        self._mark_short(ref, base_model, len(decision.workers) < replicas)
        workers = list(decision.workers)
        old_workers = list(old.get("workers") or [])
        reason, message = decision.reason, decision.message
        if set(workers) == set(old_workers) and old.get("replicas") == replicas:
            workers = old_workers  # same set: keep its order, and its reason unless that changed
            if old.get("reason") == reason or reason == placement.PLACED:
                reason, message = old.get("reason") or reason, old.get("message") or message
        elif old.get("replicas") is not None and old.get("replicas") != replicas:
            up = replicas > old["replicas"]
            reason = placement.SCALED_UP if up else placement.SCALED_DOWN
            why = "requests kept waiting" if up else "no request waited"
            message = f"replicas {old['replicas']} -> {replicas} ({why}); {decision.message}"
        elif old_workers and reason == placement.PLACED:
            reason, message = placement.MOVED, placement.why_moved(old_workers, workers, set(by_ref))
        # Make before break: the workers it left keep serving it until the new ones have it Ready.
        ready = {w for w in workers if _ready_on(by_ref.get(w), adapter_id)}
        draining = []
        if len(ready) < len(workers):
            draining = [
                w
                for w in (*old_workers, *(old.get("draining") or ()))
                if w not in workers and _ready_on(by_ref.get(w), adapter_id)
            ]
        out: dict[str, Any] = {
            "replicas": replicas,
            "workers": workers,
            "reason": reason,
            "message": cond.truncate(message, PLACEMENT_MESSAGE_MAX),
        }
        if draining:
            out["draining"] = sorted(set(draining))
        return out, len(ready)

    async def _scale_by_demand(self) -> None:
        """Add or give back replicas by the requests waiting per adapter (placement.Demand's rule)."""
        waiting: dict[str, int] = {}
        now, window = time.time(), self.settings.heartbeat_window
        for w in self.workers.values():
            if w.waiting and w.live(now, window):
                for i, n in w.waiting.items():
                    if (r := self._by_id.get(i)) is not None:
                        waiting[r] = waiting.get(r, 0) + n
        jobs = []
        for ref in waiting.keys() | self._extra.keys() | self.demand.tracked():
            obj = self.adapters.get(ref)
            placed = ((obj or {}).get("status") or {}).get("placement")
            if obj is None or not isinstance(placed, dict):
                continue
            spec = obj.get("spec") or {}
            base = self._replicas(spec.get("replicas"), spec.get("baseModel", ""))
            limit = max((v.max_replicas for v in self._pool(spec.get("baseModel", ""))), default=0)
            extra = self._extra.get(ref, 0)
            new = self.demand.step(ref, waiting.get(ref, 0), base + extra, extra, limit - base - extra, now)
            if new != extra:
                log.info(
                    "adapter %s: replicas %d -> %d (%d requests waiting)",
                    ref,
                    base + extra,
                    base + new,
                    waiting.get(ref, 0),
                )
                self._extra[ref] = new
                jobs.append(self.reconcile(ref, counted=True))
        if jobs:
            metrics.RECONCILES.labels(trigger="demand").inc(len(jobs))
            await asyncio.gather(*jobs)


def adapter_path(namespace: str, name: str = "", subresource: str = "") -> str:
    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{ADAPTER_PLURAL}"
    return "/".join(p for p in (path, name, subresource) if p)


def slim(obj: dict[str, Any]) -> dict[str, Any]:
    """The object as the cache keeps it: without metadata.managedFields (a third of an adapter's
    bytes, never read here; a status PUT without them leaves the server's as they are)."""
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or "managedFields" not in meta:
        return obj
    return {**obj, "metadata": {k: v for k, v in meta.items() if k != "managedFields"}}


def _rv(obj: dict[str, Any]) -> int:
    """The resourceVersion as a number (-1 when it is not one: such objects are never skipped)."""
    try:
        return int(str((obj.get("metadata") or {}).get("resourceVersion")))
    except ValueError:
        return -1


def _newer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """True when ``a`` has a higher resourceVersion than ``b`` (numeric on every server we know)."""
    ra, rb = (
        (a.get("metadata") or {}).get("resourceVersion"),
        (b.get("metadata") or {}).get("resourceVersion"),
    )
    try:
        return int(str(ra)) > int(str(rb))
    except (TypeError, ValueError):
        return False


def _ready_on(worker: agg_mod.WorkerView | None, adapter_id: int) -> bool:
    return worker is not None and (worker.report(adapter_id) or {}).get("state") == "Ready"


def _short(obj: dict[str, Any]) -> bool:
    """Placed on fewer workers than its replicas (full workers, or too few)."""
    placed = (obj.get("status") or {}).get("placement")
    return isinstance(placed, dict) and len(placed.get("workers") or ()) < placed.get("replicas", 0)


def _touched_by(obj: dict[str, Any], worker: str, joined: str | None) -> bool:
    """Whether a worker that came or went (``joined``: it came) can change this adapter's status."""
    placed = (obj.get("status") or {}).get("placement")
    if not isinstance(placed, dict):
        return True  # on every worker: its total moves
    workers = placed.get("workers") or []
    if worker in workers or worker in (placed.get("draining") or ()):
        return True
    if joined is None:
        return False
    uid = uid_of(obj) or ref_of(obj)
    return placement.moves_to(uid, workers, placed.get("replicas", 0), joined)


def _phase(obj: dict[str, Any]) -> str:
    return (obj.get("status") or {}).get("phase") or "Pending"


def _needs_id(obj: dict[str, Any]) -> bool:
    status = obj.get("status") or {}
    return not cond.is_true(status.get("conditions"), cond.ID_ASSIGNED) and status.get("phase") != "Failed"
