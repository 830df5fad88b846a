"""Body-based-routing ConfigMaps: which base model (and so which InferencePool) serves each served name.

The Gateway API Inference Extension's body-based router (BBR, ``pkg/bbr``; the ConfigMap reconciler
since v1.3.0, PR #2067) reads the ``model`` field of a request, looks it up in the ConfigMaps labelled
``inference.networking.k8s.io/bbr-managed: "true"`` (of its own namespace when its ``NAMESPACE`` is
set) and sets the ``X-Gateway-Base-Model-Name`` header, which each pool's HTTPRoute matches. Each
ConfigMap holds ``data.baseModel`` (a base model name, itself routed to its pool) and
``data.adapters`` (a YAML list of adapter names served on it); several ConfigMaps may name one base
model, each with a share of its adapters.

With ``--bbr-namespace`` the operator keeps these ConfigMaps current from what it already knows:
every served name held by an adapter (the name index: the oldest claimant per base model) and every
base model that has adapters or live LoRAWorkers. Nothing is proxied: BBR and the Gateway route.

- Cost: changes are gathered for ``bbr_window`` seconds; a flush updates the map (``Routes``) by the
  served names whose holder changed (the name index's journal), not the whole catalogue, and writes
  only the ConfigMaps whose content changed, so a burst of 10,000 new adapters costs a handful of
  writes, not 10,000. Each written ConfigMap goes whole (at most ``bbr_max_bytes``).
- Size: a ConfigMap must stay below 1 MiB. A base model's names are spread over 2, 4, 8, ...
  ConfigMaps by a stable hash of the name once they pass ``bbr_max_bytes``, so an add rewrites one
  ConfigMap and the split happens only when the count doubles.
- Order: BBR drops a name from its map when one ConfigMap stops listing it, even if another lists it;
  so a name that moves between ConfigMaps (a reshard, an adapter moved to another base model) is
  first removed where it was, then added where it goes.
- Conflicts: BBR needs every name unique across base models. A served name held under two base
  models goes to the oldest claimant; a served name equal to a base model name is left out (it would
  take that base model's traffic). Each adapter left out gets a Warning Event ``RoutingNameConflict``.
- Drift: every ``bbr_resync`` seconds the managed ConfigMaps are listed again and repaired.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import json
import logging
import re
import zlib
from collections.abc import Iterable, KeysView
from typing import TYPE_CHECKING, Any

import yaml

from loraplane.errors import APIConflictError, APIError, APINotFoundError
from loraplane.operator import events
from loraplane.operator.names import Claim, Key, NameIndex

if TYPE_CHECKING:
    from loraplane.operator.reconciler import Reconciler
    from loraplane.operator.settings import OperatorSettings

log = logging.getLogger("loraplane.operator.bbr")

BBR_LABEL = "inference.networking.k8s.io/bbr-managed"
MANAGED_BY = "app.kubernetes.io/managed-by"
OPERATOR = "loraplane-operator"
BASE_HASH_LABEL = "loraplane.io/bbr-base-model"
BASE_ANNOTATION = "loraplane.io/base-model"
SHARD_ANNOTATION = "loraplane.io/bbr-shard"
SELECTOR = f"{BBR_LABEL}=true,{MANAGED_BY}={OPERATOR}"
CONFLICT = "RoutingNameConflict"
MAX_SHARDS = 256
"""ConfigMaps per base model at most (256 x ~0.9 MiB of names: millions of adapters)."""


class Shard:
    """One ConfigMap's content: a base model and a share of its served names. Its lines are kept sorted
    (a served name's characters all sort above the closing quote, so by line is by name), so a change
    costs a bisection, and the text is one join of them, rebuilt only after a change."""

    def __init__(self, base_model: str, index: int, count: int, names: Iterable[str] = ()) -> None:
        self.base_model, self.index, self.count = base_model, index, count
        self.name = configmap_name(base_model, index, count)
        self._lines = {n: _entry(n)[1] for n in names}  # name -> its line
        self._sorted = sorted(self._lines.values())
        self.size = sum(len(line.encode()) for line in self._sorted)
        self._text: str | None = None
        # Against what the ConfigMap says (the publisher clears both when it wrote or read it): a new shard
        # is unwritten, all its names added.
        self.added: set[str] = set(self._lines)
        self.removed: set[str] = set()

    @property
    def names(self) -> KeysView[str]:
        return self._lines.keys()

    def add(self, name: str) -> None:
        _, line, size = _entry(name)
        self._lines[name] = line
        bisect.insort(self._sorted, line)
        self.size += size
        self._text = None
        if name in self.removed:
            self.removed.discard(name)
        else:
            self.added.add(name)

    def remove(self, name: str) -> None:
        line = self._lines.pop(name)
        del self._sorted[bisect.bisect_left(self._sorted, line)]
        self.size -= len(line.encode())
        self._text = None
        if name in self.added:
            self.added.discard(name)
        else:
            self.removed.add(name)

    def written(self) -> set[str]:
        """The names the ConfigMap lists (the last write or read of it)."""
        return (self._lines.keys() - self.added) | self.removed

    def in_sync(self) -> None:
        """The ConfigMap says what this shard says now."""
        self.added.clear()
        self.removed.clear()

    def data(self) -> dict[str, str]:
        if self._text is None:
            self._text = "".join(self._sorted)
        return {"baseModel": self.base_model, "adapters": self._text}


def base_hash(base_model: str) -> str:
    return hashlib.sha256(base_model.encode()).hexdigest()[:10]


def configmap_name(base_model: str, index: int, count: int) -> str:
    """``loraplane-bbr-<readable base model>-<hash>[-<index>]``: a DNS subdomain, unique per base model."""
    slug = re.sub(r"[^a-z0-9]+", "-", base_model.lower()).strip("-")[:40].strip("-") or "model"
    name = f"loraplane-bbr-{slug}-{base_hash(base_model)}"
    return name if count == 1 else f"{name}-{index}"


def _entry(name: str) -> tuple[int, str, int]:
    """A name's shard hash, its line in ``adapters`` and that line's bytes. One JSON string per line: a
    valid YAML block list whatever the name looks like (true, 1e3, - x)."""
    line = f"- {json.dumps(name)}\n"
    return zlib.crc32(name.encode()), line, len(line.encode())


def shards(base_model: str, names: Iterable[str], max_bytes: int) -> list[Shard]:
    """The ConfigMaps of one base model: 1, 2, 4, ... of them, each name in shard crc32(name) % count,
    the fewest whose every shard's ``adapters`` stays within ``max_bytes``."""
    entries = [(n, *_entry(n)[::2]) for n in names]  # (name, hash, bytes)
    count = 1
    while count < MAX_SHARDS and count * max_bytes < sum(e[2] for e in entries):
        count *= 2  # fewer than this cannot hold them
    while True:
        parts: list[list[str]] = [[] for _ in range(count)]
        sizes = [0] * count
        for name, h, size in entries:
            parts[h % count].append(name)
            sizes[h % count] += size
        if max(sizes) <= max_bytes or count >= MAX_SHARDS:
            if max(sizes) > max_bytes:
                log.error(
                    "base model %r: %d served names need more than %d ConfigMaps; the largest holds %d bytes",
                    base_model,
                    len(entries),
                    MAX_SHARDS,
                    max(sizes),
                )
            return [Shard(base_model, i, count, p) for i, p in enumerate(parts)]
        count *= 2


class Routes:
    """The map BBR should have, kept up to date change by change: per served name its holder under each
    base model and the base model that wins it, per base model its ConfigMaps. A change costs a few
    dictionary operations and marks the one ConfigMap it touches in ``dirty``; only a base model whose
    count of ConfigMaps doubles or halves is split again (all its names, rarely)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self._claims: dict[str, dict[str, Claim]] = {}  # served name -> base model -> its holder there
        self._named: dict[str, int] = {}  # base model -> served names claimed under it
        self._workers: set[str] = set()  # base models of the LoRAWorkers
        self._winner: dict[str, str] = {}  # served name -> the base model BBR maps it to
        self._left: dict[str, dict[str, str]] = {}  # served name -> adapter ref -> why it is left out
        self.left_out: dict[str, str] = {}  # adapter ref -> why it is left out
        self.left_changed: set[str] = (
            set()
        )  # adapter refs whose left_out entry changed (the reader empties it)
        self.shards: dict[str, list[Shard]] = {}  # base model -> its ConfigMaps
        self.by_cm: dict[str, Shard] = {}  # ConfigMap name -> its content
        self.dirty: set[str] = set()  # ConfigMaps whose content changed (the reader empties it)

    @classmethod
    def build(cls, holders: Iterable[tuple[Key, Claim]], workers: set[str], max_bytes: int) -> Routes:
        """The map from scratch (at start, and when the reconciler's caches were rebuilt)."""
        routes = cls(max_bytes)
        routes.set_worker_bases(workers)
        for key, claim in holders:
            routes.set_holder(key, claim)
        return routes

    def bases(self) -> set[str]:
        return set(self.shards)

    def set_holder(self, key: Key, holder: Claim | None) -> None:
        """The oldest claimant of ``key`` (a base model and a served name) is now ``holder``."""
        base, served = key
        claims = self._claims.get(served, {})
        old = claims.get(base)
        if old == holder:
            return
        if holder is None:
            del claims[base]
            self._named[base] -= 1
            if not self._named[base]:
                del self._named[base]
            if not claims:
                self._claims.pop(served, None)
        else:
            if old is None:
                self._named[base] = self._named.get(base, 0) + 1
            self._claims.setdefault(served, claims)[base] = holder
        if holder is not None:
            self._update_base(base)  # its ConfigMaps first: the name goes into one
        self._resolve(served)
        if holder is None:
            self._update_base(base)

    def set_worker_bases(self, bases: set[str]) -> None:
        """The base models that LoRAWorkers serve (each gets its ConfigMap, names or not)."""
        if bases == self._workers:
            return
        changed, self._workers = bases ^ self._workers, set(bases)
        for base in changed:
            self._update_base(base)

    def _update_base(self, base: str) -> None:
        """Give ``base`` its ConfigMaps when it is a base model now, take them away when it is not; and
        a served name equal to it is routed (or left out) again."""
        present = base in self._named or base in self._workers
        if present == (base in self.shards):
            return
        if present:
            self._replace(base, [Shard(base, 0, 1)])
        else:
            self._replace(base, [])
        if base in self._claims:
            self._resolve(base)

    def _resolve(self, served: str) -> None:
        """Which base model routes ``served`` (the oldest claimant, unless it names a base model)."""
        claims = sorted(self._claims.get(served, {}).items(), key=lambda bc: bc[1])
        winner: str | None = None
        left: dict[str, str] = {}
        if claims and served in self.shards:
            for base, claim in claims:
                left[claim.ref] = (
                    f"served name {served!r} is also a base model's name: body-based routing would send "
                    f"that base model's requests to {base!r}; rename the adapter (spec.name)"
                )
        elif claims:
            winner, first = claims[0]
            for _base, claim in claims[1:]:
                left[claim.ref] = (
                    f"served name {served!r} is also served for base model {winner!r} by {first.ref} "
                    f"(older); body-based routing maps a name to one base model, so requests for it go to "
                    f"{winner!r}; rename one of them (spec.name)"
                )
        old = self._winner.get(served)
        if old != winner:
            if old is not None:
                self._move(old, served, add=False)
                del self._winner[served]
            if winner is not None:
                self._move(winner, served, add=True)
                self._winner[served] = winner
        before = self._left.pop(served, {})
        if left:
            self._left[served] = left
        for ref in before.keys() | left.keys():
            if before.get(ref) != left.get(ref):
                self.left_changed.add(ref)
                if ref in left:
                    self.left_out[ref] = left[ref]
                else:
                    self.left_out.pop(ref, None)

    def _move(self, base: str, name: str, *, add: bool) -> None:
        parts = self.shards[base]
        shard = parts[_entry(name)[0] % len(parts)]
        if add:
            shard.add(name)
        else:
            shard.remove(name)
        self.dirty.add(shard.name)
        # The count stays the fewest that fit (as shards() picks it, so replicas agree): one more when
        # this shard overflows; one fewer when, after a removal, every pair that would merge fits.
        count, half = len(parts), len(parts) // 2
        if add:
            again = shard.size > self.max_bytes and count < MAX_SHARDS
        else:
            partner = parts[(shard.index + half) % count] if half else None
            again = partner is not None and shard.size + partner.size <= self.max_bytes
            again = again and all(parts[i].size + parts[i + half].size <= self.max_bytes for i in range(half))
        if again:  # every name of this base model finds its shard again
            self._replace(base, shards(base, set().union(*(p.names for p in parts)), self.max_bytes))

    def _replace(self, base: str, parts: list[Shard]) -> None:
        for old in self.shards.pop(base, []):
            self.by_cm.pop(old.name, None)
            self.dirty.add(old.name)
        if parts:
            self.shards[base] = parts
        for shard in parts:
            self.by_cm[shard.name] = shard
            self.dirty.add(shard.name)


class Publisher:
    """Keeps the BBR ConfigMaps in ``settings.bbr_namespace`` equal to the reconciler's name index."""

    def __init__(self, settings: OperatorSettings, reconciler: Reconciler) -> None:
        self.settings = settings
        self.reconciler = reconciler
        self.api = reconciler.api
        self.namespace = settings.bbr_namespace
        self._written: dict[str, dict[str, Any]] = {}  # ConfigMap name -> the object last seen/written
        self._listed: dict[str, str] = {}  # served name -> the ConfigMap that lists it
        self._warned: dict[str, str] = {}  # adapter ref -> conflict message already posted
        self._dirty = asyncio.Event()
        self._routes = Routes(settings.bbr_max_bytes)
        self._index: NameIndex | None = None  # the reconciler's name index the routes follow
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._dirty.set()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    def adapter_changed(self) -> None:
        self._dirty.set()

    def worker_changed(self, base_model: str | None) -> None:
        """A worker's report: only a base model the map does not have yet changes it (heartbeats do not)."""
        if base_model and base_model not in self._routes.shards:
            self._dirty.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        listed = 0.0
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), self.settings.bbr_resync)
            except TimeoutError:
                pass
            await asyncio.sleep(self.settings.bbr_window)  # gather the rest of the burst
            self._dirty.clear()
            try:
                if not listed or loop.time() - listed >= self.settings.bbr_resync:
                    await self.catch_up()
                    await self._list()
                    listed = loop.time()
                await self.sync()
            except APIError as exc:
                log.warning("body-based-routing ConfigMaps not synced (retrying): %s", exc)
                listed = 0.0
                self._dirty.set()
                await asyncio.sleep(self.settings.bbr_window)
            except Exception:  # a background task: log, the next change or resync retries
                log.exception("body-based-routing ConfigMaps not synced")
                listed = 0.0

    def _path(self, name: str = "") -> str:
        path = f"/api/v1/namespaces/{self.namespace}/configmaps"
        return f"{path}/{name}" if name else path

    async def catch_up(self) -> None:
        """Bring the routes up to date with the reconciler: only the served names whose holder changed
        since the last time (the name index's journal); from scratch the first time, and after the
        reconciler rebuilt its caches (a new index), off the event loop (a second at 100,000 names)."""
        rec = self.reconciler
        workers = {w.base_model for w in rec.workers.values() if w.base_model}
        if rec.names is not self._index:
            index, index.journal = rec.names, set()
            routes = await asyncio.to_thread(
                Routes.build, index.holders(), workers, self.settings.bbr_max_bytes
            )
            routes.dirty = set(routes.by_cm) | set(self._written)
            self._routes, self._index = routes, index
        assert self._index.journal is not None
        keys, self._index.journal = self._index.journal, set()
        routes = self._routes
        for key in keys:
            routes.set_holder(key, self._index.holder(key))
        routes.set_worker_bases(workers)

    async def _list(self) -> None:
        """Read the managed ConfigMaps again: those that say what the routes say need nothing more;
        the others (edited, deleted or left by hand, or by an older routes) are parsed, off the event
        loop, and rewritten."""
        body = await self.api.request("GET", self._path(), params={"labelSelector": SELECTOR})
        written = {o["metadata"]["name"]: o for o in body.get("items") or []}
        routes = self._routes
        drifted = {
            name: obj
            for name, obj in written.items()
            if (shard := routes.by_cm.get(name)) is None or not _says(obj, self._object(shard))
        }
        missing = routes.by_cm.keys() - written.keys()
        gone = self._written.keys() - written.keys()
        self._written = written
        if not (drifted or missing or gone) and self._listed:
            for shard in routes.by_cm.values():
                shard.in_sync()
            return
        parsed = await asyncio.to_thread(lambda: {name: _names(o) for name, o in drifted.items()})
        listed: dict[str, str] = {}
        for name, names in parsed.items():
            listed |= dict.fromkeys(names, name)
        for name, shard in routes.by_cm.items():
            if name in parsed:
                have = set(parsed[name])
                shard.added, shard.removed = set(shard.names) - have, have - shard.names
            elif name in missing:
                shard.added, shard.removed = set(shard.names), set()
            else:
                shard.in_sync()
                listed |= dict.fromkeys(shard.names, name)
        self._listed = listed
        routes.dirty |= drifted.keys() | missing

    async def sync(self) -> int:
        """Write the ConfigMaps whose content changed; returns the number of writes. Names that move
        between ConfigMaps are removed from the old one first (see the module docstring)."""
        await self.catch_up()
        routes = self._routes
        todo = sorted(routes.dirty)
        # 1. ConfigMaps that lose a name another one gains: first without what they lose.
        lose: dict[str, set[str]] = {}
        for name in todo:
            if (shard := routes.by_cm.get(name)) is not None:
                for n in shard.added:
                    if (where := self._listed.get(n, name)) != name:
                        other = routes.by_cm.get(where)
                        if other is None or n not in other.names:
                            lose.setdefault(where, set()).add(n)
        writes = 0
        for name, names in sorted(lose.items()):
            other = routes.by_cm.get(name)
            if other is None:
                writes += await self._delete(name)
                continue
            keep = other.written() - names
            writes += await self._put(Shard(other.base_model, other.index, other.count, keep))
            for n in names:
                if self._listed.get(n) == name:
                    del self._listed[n]
        # 2. Every changed ConfigMap as it should be; those nobody wants any more go.
        for name in todo:
            shard = routes.by_cm.get(name)
            if shard is not None:
                writes += await self._put(shard)
                for n in shard.removed:
                    if self._listed.get(n) == name:
                        del self._listed[n]
                self._listed |= dict.fromkeys(shard.added, name)
                shard.in_sync()
            elif name in self._written:
                writes += await self._delete(name)
            routes.dirty.discard(name)
        self._warn()
        if writes:
            log.info(
                "body-based routing: %d ConfigMap writes; %d ConfigMaps map %d served names of %d base models",
                writes,
                len(routes.by_cm),
                sum(len(s.names) for s in routes.by_cm.values()),
                len(routes.shards),
            )
        return writes

    def _object(self, shard: Shard) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": shard.name,
                "namespace": self.namespace,
                "labels": {
                    BBR_LABEL: "true",
                    MANAGED_BY: OPERATOR,
                    BASE_HASH_LABEL: base_hash(shard.base_model),
                },
                "annotations": {
                    BASE_ANNOTATION: shard.base_model,
                    SHARD_ANNOTATION: f"{shard.index}/{shard.count}",
                },
            },
            "data": shard.data(),
        }

    async def _put(self, shard: Shard) -> int:
        """Create or update one ConfigMap unless it already says this; 1 if it wrote."""
        body = self._object(shard)
        for _ in range(self.settings.write_retries):
            current = self._written.get(shard.name)
            if current is not None and _says(current, body):
                return 0
            try:
                if current is None:
                    result = await self.api.request("POST", self._path(), body=body)
                else:  # a PUT with the resourceVersion read: keep labels/annotations others added
                    meta = current["metadata"]
                    meta = {
                        **meta,
                        "labels": {**(meta.get("labels") or {}), **body["metadata"]["labels"]},
                        "annotations": {**(meta.get("annotations") or {}), **body["metadata"]["annotations"]},
                    }
                    result = await self.api.request(
                        "PUT", self._path(shard.name), body={**body, "metadata": meta}
                    )
            except APIConflictError:  # created by another replica, or changed since we read it
                await self._reread(shard.name)
                continue
            except APINotFoundError:  # deleted under us
                self._written.pop(shard.name, None)
                continue
            self._written[shard.name] = result
            return 1
        raise APIConflictError(409, "Conflict", f"ConfigMap {self.namespace}/{shard.name} kept changing")

    async def _reread(self, name: str) -> None:
        await self._list()  # a LIST, not a GET: one verb fewer in the operator's RBAC, and it is rare

    async def _delete(self, name: str) -> int:
        try:
            await self.api.request("DELETE", self._path(name))
        except APINotFoundError:
            pass
        self._written.pop(name, None)
        if self._routes.by_cm.get(name) is None:  # a ConfigMap that went (a new count, a base model gone)
            self._listed = {n: cm for n, cm in self._listed.items() if cm != name}
        return 1

    def _warn(self) -> None:
        """One Warning Event per adapter when it is left out (again, if the reason changed)."""
        routes = self._routes
        changed, routes.left_changed = routes.left_changed, set()
        for ref in changed:
            message = routes.left_out.get(ref)
            if message is None:
                self._warned.pop(ref, None)
                continue
            obj = self.reconciler.adapters.get(ref)
            if obj is None or self._warned.get(ref) == message:
                continue
            self._warned[ref] = message
            log.warning("adapter %s: not routed by body-based routing: %s", ref, message)
            self.reconciler.events.post(obj, events.Note(CONFLICT, message, warning=True))


def _says(obj: dict[str, Any], body: dict[str, Any]) -> bool:
    """True when the ConfigMap ``obj`` already has ``body``'s data, labels and annotations."""
    meta = obj.get("metadata") or {}
    return obj.get("data") == body["data"] and all(
        (meta.get(part) or {}).get(k) == v
        for part in ("labels", "annotations")
        for k, v in body["metadata"][part].items()
    )


def _names(obj: dict[str, Any]) -> list[str]:
    """The adapter names a ConfigMap lists (as BBR parses them: a YAML list of strings)."""
    raw = (obj.get("data") or {}).get("adapters") or ""
    try:
        value = yaml.safe_load(raw) if raw.strip() else []
    except yaml.YAMLError:
        return []
    return [str(v) for v in value] if isinstance(value, list) else []
