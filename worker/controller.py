"""Reconciles the adapters this worker should serve (from the watch) with what it has (the registry).

Each adapter version (ID) gets its own task: resolve -> prefetch -> validate -> Ready, or Failed with
a reason. Tasks run under a bound on concurrency, so one slow or bad adapter never blocks the others.
Retryable failures (network, a full cache) are retried with capped exponential backoff while the
adapter stays in its stage with the reason in its report; permanent ones are reported once.

Versions: when an adapter's ID changes (a new path or revision), the old version keeps serving until
the new one is Ready, then it is dropped. If the new version fails, the old one keeps serving and the
new one is reported Failed: a bad push never takes a working adapter away. A deleted adapter, or one
that lost its served name, is dropped at once, its cache entry with it. Served entries are pinned in
the cache.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from loraplane.crds.models import AdapterInfo, WorkerAdapterReport
from loraplane.errors import LoraplaneError
from loraplane.worker import provenance, sources, validate
from loraplane.worker.cache import CacheEntry
from loraplane.worker.inference import basemodel
from loraplane.worker.inference.engines import EngineSlot
from loraplane.worker.prefetch import Prefetcher
from loraplane.worker.registry import Registry, State, VersionEntry, takes_over
from loraplane.worker.watch import AdapterWatch, DesiredVersion

log = logging.getLogger(__name__)

FAILURES = Counter(
    "loraplane_worker_adapter_failures",
    "Adapter versions that ended Failed on this worker, by reason (resolve, prefetch or validation)",
    ["reason"],
)
ADAPTERS = Gauge("loraplane_worker_adapters", "Adapter versions known to this worker, by state", ["state"])
STATES: tuple[State, ...] = ("Pending", "Prefetching", "Validating", "Ready", "Failed")
INTERNAL_ERROR = "InternalError"
RETRY_START = 1.0  # seconds before the first retry of a retryable failure
RETRY_MAX = 60.0  # seconds: the cap between retries


@dataclass
class _Known:
    """The controller's own bookkeeping for one adapter version: what it should be is ``desired`` (from
    the watch), where it stands is ``version`` (the registry entry, kept here as last written)."""

    desired: DesiredVersion
    version: VersionEntry
    info: AdapterInfo | None = None
    cache_key: str | None = None  # pinned while known
    task: asyncio.Task[None] | None = None


class Controller:
    """Drives every desired adapter version to Ready (or Failed) and keeps ``registry`` current.

    ``on_change(id)`` is called after any state change of that adapter version (the reporter batches
    the writes). Work per change is O(1): nothing here walks every adapter except a full reconcile.
    """

    def __init__(
        self,
        registry: Registry,
        prefetcher: Prefetcher,
        base: basemodel.ModelConfig,
        source_settings: sources.SourceSettings,
        *,
        served_model: str,
        max_lora_rank: int,
        dtype: str = "float32",
        max_concurrent: int = 16,
        on_change: Callable[[int], None] = lambda _id: None,
        engine: EngineSlot | None = None,
        trust: provenance.Trust | None = None,
        require_signatures: bool = False,
    ) -> None:
        self.registry = registry
        # Whom this pool trusts to sign adapters, and whether every adapter needs a signature (else only
        # those whose spec.signature asks for one).
        self.trust = trust or provenance.Trust()
        self.require_signatures = require_signatures
        # The engine (None: a control-mode worker, which serves nothing). A validated version is loaded
        # into it before it is reported Ready, so not before the base weights are loaded: a status that
        # says Ready while nothing can be served is the failure we avoid.
        self.engine = engine
        self.prefetcher = prefetcher
        self.cache = prefetcher.index
        self.base = base
        self.source_settings = source_settings
        self.served_model = served_model
        self.max_lora_rank = max_lora_rank
        self.dtype = dtype  # the serving dtype: the bound an adapter's update must fit in
        self.on_change = on_change
        self._limit = asyncio.Semaphore(max_concurrent)
        self._known: dict[int, _Known] = {}
        self._versions: dict[str, set[int]] = {}  # namespace/name -> its known version IDs
        self._counts = dict.fromkeys(STATES, 0)  # known versions by state (the gauge)
        self._desired: dict[int, DesiredVersion] = {}
        self.synced = asyncio.Event()  # set once the first desired state has been applied

    # --- the loop --------------------------------------------------------------------------------
    async def run(self, watch: AdapterWatch) -> None:
        """Apply the watch's desired state whenever it changes, until cancelled."""
        try:
            while True:
                await watch.changed.wait()
                watch.changed.clear()
                self.reconcile(watch.desired, watch.take_dirty(), watch.by_adapter)
                if watch.synced.is_set():
                    self.synced.set()
        finally:
            for known in self._known.values():
                if known.task is not None:
                    known.task.cancel()

    def reconcile(
        self,
        desired: dict[int, DesiredVersion],
        changed: set[int] | None = None,
        by_adapter: dict[str, int] | None = None,
    ) -> None:
        """Start work for new IDs and drop versions that are no longer wanted. Never blocks.

        ``changed``: only these IDs changed in ``desired`` since the last call (None: look at all), with
        ``by_adapter`` (namespace/name -> desired ID) kept current by the caller."""
        self._desired = desired
        if changed is None:
            changed = set(desired) | set(self._known)
            by_adapter = {d.adapter: d.id for d in desired.values()}
        assert by_adapter is not None, "an incremental reconcile needs by_adapter"
        # Every version of a touched adapter is looked at again (an old one kept serving may go now).
        for adapter_id in list(changed):
            touched = desired.get(adapter_id) or self._known.get(adapter_id)
            if touched is not None:
                key = touched.adapter if isinstance(touched, DesiredVersion) else touched.desired.adapter
                changed |= self._versions.get(key, set())
        for adapter_id in sorted(changed):
            want = desired.get(adapter_id)
            if want is None:
                continue
            known = self._known.get(adapter_id)
            if want.stale:
                continue  # its ID names the previous version; the new one gets an ID soon
            if known is None:
                self._start(want)
            elif known.desired != want:
                # Same version, other metadata (served name, long-context length): prepare it again
                # (a cache hit), and stop serving it under the old name at once.
                log.info(
                    "adapter %s (id %d) changed: %s -> %s", want.adapter, adapter_id, known.desired, want
                )
                self._drop(adapter_id)
                self._start(want)
        for adapter_id in sorted(changed):
            known = self._known.get(adapter_id)
            if adapter_id in desired or known is None:
                continue
            newer = by_adapter.get(known.desired.adapter)
            newer_known = self._known.get(newer) if newer is not None else None
            if newer is not None and not takes_over(
                known.version, newer_known.version if newer_known is not None else None
            ):
                continue  # keep serving the old version until the new one is Ready
            # Deleted (or no longer this worker's): its files leave the cache now, not when the
            # volume fills. An older version of a still-wanted adapter stays cached (a rollback hits).
            self._drop(adapter_id, forget=newer is None)

    def _start(self, want: DesiredVersion) -> None:
        version = VersionEntry(
            id=want.id, served_name=want.served_name, adapter=want.adapter, max_length=want.max_length
        )
        known = _Known(want, version)
        self._known[want.id] = known
        self._versions.setdefault(want.adapter, set()).add(want.id)
        self.registry.upsert(version)
        self._changed(want.id, None, version.state)
        known.task = asyncio.create_task(self._prepare(known), name=f"adapter {want.adapter} id {want.id}")

    def _drop(self, adapter_id: int, *, forget: bool = False) -> None:
        """Stop serving a version; ``forget``: also remove its cache entry (unless another version
        pins the same files)."""
        known = self._known.pop(adapter_id, None)
        if known is None:
            return
        versions = self._versions.get(known.desired.adapter, set())
        versions.discard(adapter_id)
        if not versions:
            self._versions.pop(known.desired.adapter, None)
        self._changed(adapter_id, known.version.state, None)
        if known.task is not None and not known.task.done():
            known.task.cancel()
        self._release(known, discard=forget)
        self.registry.remove(adapter_id)
        log.info("dropped adapter %s id %d (%s)", known.desired.adapter, adapter_id, known.version.state)

    # --- one adapter version ---------------------------------------------------------------------
    async def _prepare(self, known: _Known) -> None:
        want = known.desired
        delay = RETRY_START
        while True:
            try:
                async with self._limit:
                    await self._pipeline(known)
                return
            except LoraplaneError as e:
                if not e.retry:
                    FAILURES.labels(e.reason).inc()
                    self._set(known, "Failed", e.reason, e.message)
                    log.warning("adapter %s id %d failed: %s", want.adapter, want.id, e)
                    self._release(known, discard=True)
                    return
                message = f"{e.message} (retrying in {delay:.0f}s)"
                self._set(known, known.version.state, e.reason, message)
                log.warning("adapter %s id %d: %s; retrying in %.1fs", want.adapter, want.id, e, delay)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a bug must not take the worker down; report it on this adapter
                log.exception("adapter %s id %d: unexpected error", want.adapter, want.id)
                FAILURES.labels(INTERNAL_ERROR).inc()
                self._set(known, "Failed", INTERNAL_ERROR, f"unexpected {type(e).__name__}: {e}")
                self._release(known)
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)

    async def _pipeline(self, known: _Known) -> None:
        want = known.desired
        self._set(known, "Prefetching")
        resolved = await self._resolve(want)
        # Pinned in the same step as the prefetch, so no other prefetch can evict it in between.
        cached: CacheEntry = await asyncio.to_thread(self.prefetcher.prefetch, resolved, pin=True)
        if known.cache_key != cached.cache_key:
            self._release(known)
            known.cache_key = cached.cache_key
        else:
            self.cache.unpin(cached.cache_key)  # already held by this version: keep one pin
        self._set(known, "Validating")
        signer = await asyncio.to_thread(self._provenance, want, cached)
        summary = await asyncio.to_thread(
            validate.validate_adapter,
            cached.path,
            self.base,
            max_lora_rank=self.max_lora_rank,
            max_length=want.max_length,
            served_model=self.served_model,
            sha256=cached.sha256(),
            dtype=self.dtype,
        )
        known.info = AdapterInfo(
            rank=summary.rank,
            alpha=summary.alpha,
            useRslora=summary.use_rslora,
            targetModules=list(summary.target_modules)[:64],
            sizeBytes=summary.size_bytes,
            sha256=summary.sha256,
            digest=cached.digest,
            signer=signer,
            resolvedRevision=resolved.resolved_revision,
            chatTemplate=summary.chat_template_source,
        )
        for warning in summary.warnings:
            log.warning("adapter %s id %d: %s", want.adapter, want.id, warning)
        message = "; ".join(summary.warnings) or None
        if self.engine is not None:
            if not self.engine.filled():
                self._set(
                    known, "Validating", "WaitingForEngine", "validated; waiting for the base model to load"
                )
            engine = await self.engine.wait()
            # Warm: the engine holds the weights before the name can route a request to them; an engine
            # that refuses the adapter fails it here, with the engine's reason, and nothing else.
            await engine.add_adapter(
                dataclasses.replace(
                    known.version, local_dir=cached.path, chat_template=summary.chat_template
                ).lora_spec()
            )
        self._set(
            known,
            "Ready",
            None,
            message,
            local_dir=cached.path,
            rank=summary.rank,
            scaling=summary.scaling,
            warnings=tuple(summary.warnings),
            chat_template=summary.chat_template,
        )
        log.info("adapter %s id %d Ready (rank %d, %s)", want.adapter, want.id, summary.rank, resolved.uri)
        self._retire_older(known)

    def _provenance(self, want: DesiredVersion, cached: CacheEntry) -> str | None:
        """Check the pinned digest and the signature before anything reads the files; the signer, if any.

        A refusal is permanent: the version is Failed and its files leave the cache (``_prepare``)."""
        where = f"adapter {want.adapter} ({want.path})"
        if want.digest is not None:
            provenance.check_digest(want.digest, cached.digest, where)
        if not (self.require_signatures or want.signature_required):
            return None
        return provenance.verify(
            cached.path / provenance.SIGNATURE_FILE, cached.file_digests, self.trust, where
        )

    async def _resolve(self, want: DesiredVersion) -> sources.ResolvedSource:
        """Resolve the path; when the Hub is unreachable, fall back to the resolution recorded when the
        cached copy was fetched, so a restarted worker serves from its cache through a Hub outage."""
        try:
            return await asyncio.to_thread(sources.resolve, want.path, want.revision, self.source_settings)
        except LoraplaneError as e:
            if not e.retry or sources.parse_path(want.path)[0] != "hf":
                raise
            offline = dataclasses.replace(self.source_settings, hf_offline=True)
            try:
                recorded = await asyncio.to_thread(sources.resolve, want.path, want.revision, offline)
            except LoraplaneError:
                raise e from None
            if self.cache.lookup(recorded.cache_key) is None:
                raise
            log.warning(
                "adapter %s id %d: %s; serving the cached copy of %s@%s resolved earlier",
                want.adapter,
                want.id,
                e,
                recorded.uri,
                recorded.resolved_revision[:12],
            )
            return recorded

    def quarantine(self, adapter_id: int, error: LoraplaneError) -> None:
        """The engine found this Ready version unservable while serving it (NaN / Inf output): Failed on
        this worker with the engine's reason, so no new request reaches it, the engine drops it once its
        requests end, and the report (then the adapter's status and a Warning Event) says why. Pushing a
        new version (a new ID) is the way back."""
        known = self._known.get(adapter_id)
        if known is None or known.version.state != "Ready":
            return
        FAILURES.labels(error.reason).inc()
        message = f"quarantined on this worker while serving: {error.message}"
        self._set(known, "Failed", error.reason, message)
        log.warning("adapter %s id %d quarantined: %s", known.desired.adapter, adapter_id, error)

    def _release(self, known: _Known, *, discard: bool = False) -> None:
        """Unpin this version's cache entry; ``discard``: a refused version's files, which serve no one,
        also leave the cache (unless another version pins the same files)."""
        if known.cache_key is not None:
            if discard:
                self.cache.discard(known.cache_key)
            else:
                self.cache.unpin(known.cache_key)
            known.cache_key = None

    def _retire_older(self, ready: _Known) -> None:
        """The new version is Ready: drop the older versions of the same adapter that are no longer desired."""
        for adapter_id in list(self._versions.get(ready.desired.adapter, ())):
            older = self._known.get(adapter_id)
            if adapter_id not in self._desired and (
                older is None or takes_over(older.version, ready.version)
            ):
                self._drop(adapter_id)

    # --- state -----------------------------------------------------------------------------------
    def _set(
        self,
        known: _Known,
        state: State,
        reason: str | None = None,
        message: str | None = None,
        **version: object,
    ) -> None:
        if self._known.get(known.desired.id) is not known:
            return  # dropped meanwhile
        old = known.version.state
        known.version = known.version.with_state(state, reason=reason, message=message, **version)
        self.registry.upsert(known.version)
        self._changed(known.desired.id, old, state)

    def _changed(self, adapter_id: int, old: State | None, new: State | None) -> None:
        for state, step in ((old, -1), (new, 1)):
            if state is not None:
                self._counts[state] += step
                ADAPTERS.labels(state).set(self._counts[state])
        self.on_change(adapter_id)

    def report(self, adapter_id: int) -> WorkerAdapterReport | None:
        """What this worker reports for one adapter ID (None: it does not have it)."""
        known = self._known.get(adapter_id)
        if known is None:
            return None
        v = known.version
        return WorkerAdapterReport(
            id=adapter_id,
            adapter=v.adapter,
            state=v.state,
            reason=v.reason,
            message=(v.message or "")[:2048] or None,
            info=known.info,
        )

    def known_ids(self) -> list[int]:
        return list(self._known)

    def reports(self) -> list[WorkerAdapterReport]:
        """Every adapter's report, by ID (the /adapters endpoint)."""
        return [r for i in sorted(self._known) if (r := self.report(i)) is not None]

    def states(self) -> dict[int, State]:
        return {i: k.version.state for i, k in self._known.items()}
