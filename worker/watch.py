"""The worker's view of which adapters it should serve: list, then watch, LoRAAdapter objects.

One loop per watched scope (all namespaces, or each configured namespace) keeps the objects it has
seen and turns them into the desired state, ``{id: DesiredVersion}``, for this worker's base model.
It lists, watches from the list's resourceVersion, and resumes from the last event's resourceVersion
when a watch ends, after checking that the server has reached it. It relists instead when the server
answers 410 Gone (the HTTP status or the in-stream ERROR event), 404 (the CRD was deleted, or an API
server came back with an empty store) or "resourceVersion too large", and when the server's current
resourceVersion is below ours (its store was replaced or restored: resuming would wait for versions
it never issues). It reconnects with the shared backoff when the API server goes away. Each scope
keeps its objects until it relists, so a worker never drops an adapter because it has not looked yet.

Adapters without ``status.id`` (not registered yet) or without ``NameAvailable=True`` are not desired,
nor are adapters the operator placed on other workers (``status.placement`` present and not naming this
worker's LoRAWorker): a worker prefetches, validates and serves only what is placed on it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from loraplane import errors
from loraplane.crds import conditions
from loraplane.crds.models import ADAPTER_PLURAL, API_VERSION, AdapterLimits, parse_adapter, version_of
from loraplane.errors import LoraplaneError
from loraplane.kube import Backoff, KubeClient, rv_behind

log = logging.getLogger(__name__)

LISTS = Counter(
    "loraplane_worker_adapter_lists", "Full lists of LoRAAdapter objects (the first and every relist)"
)
RECONNECTS = Counter(
    "loraplane_worker_watch_reconnects", "LoRAAdapter list/watch attempts that failed and backed off"
)


@dataclass(frozen=True)
class DesiredVersion:
    """One adapter version this worker should serve, from a LoRAAdapter object."""

    id: int
    adapter: str  # namespace/name of the LoRAAdapter
    served_name: str
    path: str
    revision: str | None
    max_length: int | None  # spec.longContext.maxLength
    uid: str = ""
    stale: bool = False
    """The operator has not caught up with the spec: a new version (path/revision/digest) has no ID yet, so
    status.id still names the previous one, or NameAvailable was decided for an older generation (the
    served name may have changed). Keep serving what we have; start nothing."""
    digest: str | None = None
    """spec.digest: the fetched files must hash to it."""
    signature_required: bool = False
    """spec.signature.required: serve it only with a valid signature."""
    limits: AdapterLimits | None = field(default=None, compare=False)
    """spec.limits: not part of the version (an edit applies at once through ``on_limits``)."""
    replicas: int = field(default=1, compare=False)
    """Workers with the adapter Ready (status.workers.ready, at least 1): the limits' divisor."""


def placed_here(obj: dict[str, Any], me: str | None) -> bool:
    """Whether the adapter is this worker's to hold: no status.placement (every worker), or it names
    ``me`` (namespace/name of this worker's LoRAWorker) as a worker or a draining one."""
    placed = (obj.get("status") or {}).get("placement")
    if me is None or not isinstance(placed, dict):
        return True
    return me in (placed.get("workers") or ()) or me in (placed.get("draining") or ())


def desired_from(obj: dict[str, Any], served_model: str, me: str | None = None) -> DesiredVersion | None:
    """The desired version for one LoRAAdapter object, or None when this worker (``me``: the
    namespace/name of its LoRAWorker) should not serve it."""
    spec = obj.get("spec") or {}
    if spec.get("baseModel") != served_model:
        return None
    meta = obj.get("metadata") or {}
    key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    if meta.get("deletionTimestamp") or not placed_here(obj, me):
        return None
    try:
        adapter = parse_adapter(obj)
    except LoraplaneError as e:  # the operator reports it on the object; nothing to serve
        log.debug("not serving %s: %s", key, e)
        return None
    status = adapter.status
    if status is None or status.id is None:
        return None
    name = next((c for c in status.conditions or [] if c.type == conditions.NAME_AVAILABLE), None)
    if name is None or name.status != "True":
        return None  # the served name is another adapter's, or not decided yet: serving could hijack it
    generation = meta.get("generation")
    # The operator has not looked at this spec yet (a new served name may be taken): keep what we have.
    undecided = (
        name.observedGeneration is not None
        and generation is not None
        and name.observedGeneration != generation
    )
    want = adapter.spec
    moved = status.version is not None and status.version != version_of(want.path, want.revision, want.digest)
    return DesiredVersion(
        id=status.id,
        adapter=key,
        served_name=adapter.served_name,
        path=want.path,
        revision=want.revision,
        max_length=want.longContext.maxLength if want.longContext else None,
        digest=want.digest,
        signature_required=want.signature is not None and want.signature.required,
        uid=str(meta.get("uid", "")),
        stale=moved or undecided,
        limits=want.limits,
        replicas=max(1, status.workers.ready if status.workers else 1),
    )


class AdapterWatch:
    """Desired adapters for ``served_model`` in ``namespaces`` (empty: all), kept current by list+watch.

    ``desired`` is the latest state, ``by_adapter`` its IDs by namespace/name; ``changed`` is set
    whenever it changes (the consumer clears it and takes the IDs that changed with ``take_dirty()``).
    An event costs O(1): only the one object's entry is recomputed.
    ``synced`` is set once every scope has listed at least once.
    """

    def __init__(
        self,
        api: KubeClient,
        served_model: str,
        namespaces: tuple[str, ...] = (),
        me: str | None = None,
        elsewhere: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.api = api
        self.served_model = served_model
        self.me = me  # namespace/name of this worker's LoRAWorker, as status.placement names it
        # Served name -> the workers an adapter placed elsewhere is on (Registry.elsewhere), and the
        # served name each object has there, so a delete or a rename removes its entry.
        self.elsewhere: dict[str, tuple[str, ...]] = {} if elsewhere is None else elsewhere
        self._elsewhere_of: dict[str, str] = {}
        self.scopes: tuple[str, ...] = namespaces or ("",)
        self.desired: dict[int, DesiredVersion] = {}
        self.by_adapter: dict[str, int] = {}
        self._dirty: set[int] = set()
        self.changed = asyncio.Event()
        self.synced = asyncio.Event()
        # Per scope, object key -> what it asks of this worker (None: nothing), computed once per event
        # so that a relist or a burst of events does not re-validate every object each time.
        self._objects: dict[str, dict[str, DesiredVersion | None]] = {scope: {} for scope in self.scopes}
        self._listed: set[str] = set()
        self._rv: dict[str, str | None] = dict.fromkeys(self.scopes)  # where each scope resumes
        self.relists = 0  # how many lists ran (the first included): for tests and metrics
        self.reconnects = 0
        # (namespace/name, spec.limits, replicas) on every event: limits apply without a new version
        self.on_limits: Callable[[str, AdapterLimits | None, int], None] | None = None

    def _path(self, scope: str) -> str:
        base = f"/apis/{API_VERSION}"
        return f"{base}/namespaces/{scope}/{ADAPTER_PLURAL}" if scope else f"{base}/{ADAPTER_PLURAL}"

    async def run(self) -> None:
        """Run every scope's loop until cancelled."""
        async with asyncio.TaskGroup() as tg:
            for scope in self.scopes:
                tg.create_task(self._scope_loop(scope), name=f"watch {scope or 'all namespaces'}")

    async def _scope_loop(self, scope: str) -> None:
        backoff = Backoff()
        self._rv[scope] = None
        where = scope or "all namespaces"
        while True:
            try:
                rv = self._rv[scope]
                if rv is not None and rv_behind(await self.api.resource_version(self._path(scope)), rv):
                    log.warning(
                        "LoRAAdapters in %s: the API server's resourceVersion went back below %s (a new or "
                        "restored store); relisting",
                        where,
                        rv,
                    )
                    self._rv[scope] = None
                if self._rv[scope] is None:
                    self._rv[scope] = await self._list(scope)
                    backoff.reset()
                await self._watch(scope)
                backoff.reset()  # a watch that ended normally (timeout): resume at once
            except (errors.APIGoneError, errors.APIResourceVersionTooLargeError) as e:
                log.info(
                    "LoRAAdapters in %s: resourceVersion %s unusable (%s); relisting",
                    where,
                    self._rv[scope],
                    e,
                )
                self._rv[scope] = None
            except errors.APIError as e:
                if isinstance(e, errors.APINotFoundError):
                    self._rv[scope] = None  # the resource type itself is gone: list once it is back
                self.reconnects += 1
                RECONNECTS.inc()
                wait = backoff.next()
                log.warning("LoRAAdapter list/watch in %s failed (%s); retrying in %.1fs", where, e, wait)
                await asyncio.sleep(wait)

    async def _list(self, scope: str) -> str:
        body = await self.api.request("GET", self._path(scope))
        self.relists += 1
        LISTS.inc()
        items = {}
        for obj in body.get("items") or []:
            meta = obj.get("metadata") or {}
            key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
            items[key] = desired_from(obj, self.served_model, self.me)
            self._note_elsewhere(key, obj)
        old = self._objects[scope]
        self._objects[scope] = items  # replaces: objects deleted while we were away disappear
        self._listed.add(scope)
        for key in old.keys() | items.keys():
            self._apply(key, old.get(key), items.get(key))
        self._publish()
        return str((body.get("metadata") or {}).get("resourceVersion", "0"))

    async def _watch(self, scope: str) -> None:
        """Follow events from the scope's resourceVersion, advancing it with every event (bookmarks
        included), so a watch that breaks resumes where it was, not where it started."""
        rv = self._rv[scope] or "0"
        async for event in self.api.watch(self._path(scope), resource_version=rv):
            kind, obj = event.get("type"), event.get("object") or {}
            meta = obj.get("metadata") or {}
            rv = str(meta.get("resourceVersion", rv))
            self._rv[scope] = rv
            if kind == "BOOKMARK":
                continue
            key = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
            old = self._objects[scope].get(key)
            if kind == "DELETED":
                self._objects[scope].pop(key, None)
                self._apply(key, old, None)
                self._note_elsewhere(key, None)
            elif kind in ("ADDED", "MODIFIED"):
                new = self._objects[scope][key] = desired_from(obj, self.served_model, self.me)
                self._apply(key, old, new)
                self._note_elsewhere(key, obj)
            self._publish()

    def _apply(self, key: str, old: DesiredVersion | None, new: DesiredVersion | None) -> None:
        """One object's desired version went from ``old`` to ``new``."""
        if self.on_limits is not None and (new is not None or old is not None):
            self.on_limits(key, new.limits if new else None, new.replicas if new else 1)
        if old == new:
            return
        if old is not None and self.desired.get(old.id) == old:
            del self.desired[old.id]
            self._dirty.add(old.id)
        if self.by_adapter.get(key) == (old.id if old else None):
            self.by_adapter.pop(key, None)
        if new is not None:
            self.desired[new.id] = new
            self.by_adapter[key] = new.id
            self._dirty.add(new.id)

    def _note_elsewhere(self, key: str, obj: dict[str, Any] | None) -> None:
        """Keep ``elsewhere`` current for one object: its served name while it is placed on others."""
        gone = self._elsewhere_of.pop(key, None)
        if gone is not None:
            self.elsewhere.pop(gone, None)
        if (
            obj is None
            or placed_here(obj, self.me)
            or (obj.get("spec") or {}).get("baseModel") != self.served_model
        ):
            return
        spec, status = obj.get("spec") or {}, obj.get("status") or {}
        served = spec.get("name") or (obj.get("metadata") or {}).get("name")
        if isinstance(served, str) and status.get("id"):
            self.elsewhere[served] = tuple((status.get("placement") or {}).get("workers") or ())
            self._elsewhere_of[key] = served

    def take_dirty(self) -> set[int]:
        """The IDs whose desired version changed since the last call."""
        dirty, self._dirty = self._dirty, set()
        return dirty

    def _publish(self) -> None:
        """Tell the consumer when the desired state changed. Scopes not listed yet contribute nothing:
        at start that only delays their adapters (nothing is known to drop), and one unreachable
        namespace (RBAC, a typo) does not hold up the others. ``synced`` is set once every scope has
        listed."""
        all_listed = len(self._listed) == len(self.scopes)
        if self._dirty or (all_listed and not self.synced.is_set()):
            if all_listed:
                self.synced.set()
            self.changed.set()
