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

- Cost: changes are gathered for ``bbr_window`` seconds; a flush recomputes the map (O(adapters), in
  memory) and writes only ConfigMaps whose content changed, so a burst of 10,000 new adapters costs a
  handful of writes, not 10,000.
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
import functools
import hashlib
import json
import logging
import re
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import yaml

from loraplane.errors import APIConflictError, APIError, APINotFoundError
from loraplane.operator import events

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


@dataclass(frozen=True)
class Shard:
    """One ConfigMap's content: a base model and a share of its served names."""

    base_model: str
    index: int
    count: int
    names: frozenset[str]

    @property
    def name(self) -> str:
        return configmap_name(self.base_model, self.index, self.count)

    def data(self) -> dict[str, str]:
        return {"baseModel": self.base_model, "adapters": "".join(_entry(n)[1] for n in sorted(self.names))}


def base_hash(base_model: str) -> str:
    return hashlib.sha256(base_model.encode()).hexdigest()[:10]


def configmap_name(base_model: str, index: int, count: int) -> str:
    """``loraplane-bbr-<readable base model>-<hash>[-<index>]``: a DNS subdomain, unique per base model."""
    slug = re.sub(r"[^a-z0-9]+", "-", base_model.lower()).strip("-")[:40].strip("-") or "model"
    name = f"loraplane-bbr-{slug}-{base_hash(base_model)}"
    return name if count == 1 else f"{name}-{index}"


@functools.lru_cache(maxsize=200_000)
def _entry(name: str) -> tuple[int, str, int]:
    """A name's shard hash, its line in ``adapters`` and that line's bytes; cached, so a flush over
    100,000 names costs dictionary lookups, not 100,000 encodings. One JSON string per line: a valid YAML
    block list whatever the name looks like (true, 1e3, - x)."""
    line = f"- {json.dumps(name)}\n"
    return zlib.crc32(name.encode()), line, len(line.encode())


def shards(base_model: str, names: set[str], max_bytes: int) -> list[Shard]:
    """The ConfigMaps of one base model: 1, 2, 4, ... of them, each name in shard crc32(name) % count,
    the fewest whose every shard's ``adapters`` stays within ``max_bytes``."""
    entries = [(n, *_entry(n)[::2]) for n in names]  # (name, hash, bytes)
    count = 1
    while count < MAX_SHARDS and count * max_bytes < sum(e[2] for e in entries):
        count *= 2  # fewer than this cannot hold them
    while True:
        parts: list[set[str]] = [set() for _ in range(count)]
        sizes = [0] * count
        for name, h, size in entries:
            parts[h % count].add(name)
            sizes[h % count] += size
        if max(sizes) <= max_bytes or count >= MAX_SHARDS:
            if max(sizes) > max_bytes:
                log.error(
                    "base model %r: %d served names need more than %d ConfigMaps; the largest holds %d bytes",
                    base_model,
                    len(names),
                    MAX_SHARDS,
                    max(sizes),
                )
            return [Shard(base_model, i, count, frozenset(p)) for i, p in enumerate(parts)]
        count *= 2


def desired_map(
    holders: list[tuple[str, str, Any, str]], base_models: set[str]
) -> tuple[dict[str, set[str]], dict[str, str]]:
    """Base model -> the served names BBR should map to it, and adapter ref -> why it is left out.

    ``holders``: (base model, served name, claim order, adapter ref) of every name's holder.
    """
    by_name: dict[str, list[tuple[Any, str, str]]] = {}
    for base, served, order, ref in holders:
        by_name.setdefault(served, []).append((order, base, ref))
    routed: dict[str, set[str]] = {b: set() for b in base_models}
    left_out: dict[str, str] = {}
    for served, claims in by_name.items():
        claims.sort()
        if served in base_models:
            for _, base, ref in claims:
                left_out[ref] = (
                    f"served name {served!r} is also a base model's name: body-based routing would send "
                    f"that base model's requests to {base!r}; rename the adapter (spec.name)"
                )
            continue
        _, winner, winner_ref = claims[0]
        routed.setdefault(winner, set()).add(served)
        for _, _base, ref in claims[1:]:
            left_out[ref] = (
                f"served name {served!r} is also served for base model {winner!r} by {winner_ref} (older); "
                f"body-based routing maps a name to one base model, so requests for it go to {winner!r}; "
                "rename one of them (spec.name)"
            )
    return routed, left_out


class Publisher:
    """Keeps the BBR ConfigMaps in ``settings.bbr_namespace`` equal to the reconciler's name index."""

    def __init__(self, settings: OperatorSettings, reconciler: Reconciler) -> None:
        self.settings = settings
        self.reconciler = reconciler
        self.api = reconciler.api
        self.namespace = settings.bbr_namespace
        self._written: dict[str, dict[str, Any]] = {}  # ConfigMap name -> the object last seen/written
        self._have: dict[str, frozenset[str]] = {}  # ConfigMap name -> the names it lists (parsed once)
        self._warned: dict[str, str] = {}  # adapter ref -> conflict message already posted
        self._dirty = asyncio.Event()
        self._bases: set[str] = set()
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
        if base_model and base_model not in self._bases:
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

    async def _list(self) -> None:
        body = await self.api.request("GET", self._path(), params={"labelSelector": SELECTOR})
        written = {o["metadata"]["name"]: o for o in body.get("items") or []}
        # Parsing the names (YAML) is the slow part at 100,000 names: off the event loop too.
        have = await asyncio.to_thread(lambda: {name: frozenset(_names(o)) for name, o in written.items()})
        self._written, self._have = written, have

    def desired(self) -> tuple[list[tuple[str, str, Any, str]], set[str]]:
        """The inputs of the map, copied from the caches (on the event loop, which changes them)."""
        rec = self.reconciler
        holders = [(key[0], key[1], claim, claim.ref) for key, claim in rec.names.holders()]
        bases = {h[0] for h in holders} | {w.base_model for w in rec.workers.values() if w.base_model}
        self._bases = bases
        return holders, bases

    def compute(
        self, holders: list[tuple[str, str, Any, str]], bases: set[str]
    ) -> tuple[dict[str, Shard], dict[str, str]]:
        """ConfigMap name -> its content, and the adapters left out (ref -> why)."""
        routed, left_out = desired_map(holders, bases)
        out: dict[str, Shard] = {}
        for base, names in routed.items():
            for shard in shards(base, names, self.settings.bbr_max_bytes):
                out[shard.name] = shard
        return out, left_out

    async def sync(self) -> int:
        """Write what changed; returns the number of writes. Names that move between ConfigMaps are
        removed from the old one first (see the module docstring)."""
        # The map is computed off the event loop: at 100,000 adapters it takes a second or more.
        want, left_out = await asyncio.to_thread(self.compute, *self.desired())
        have = {name: set(self._have.get(name, ())) for name in self._written}
        gained: dict[str, set[str]] = {n: set(s.names) - have.get(n, set()) for n, s in want.items()}
        all_gained = set().union(*gained.values()) if gained else set()
        writes = 0
        # 1. ConfigMaps that lose a name another one gains: first without what they lose.
        for name, old in have.items():
            if not old & all_gained - (set(want[name].names) if name in want else set()):
                continue
            if name not in want:
                writes += await self._delete(name)
                continue
            s = want[name]
            writes += await self._put(Shard(s.base_model, s.index, s.count, frozenset(old & s.names)))
        # 2. Every ConfigMap as it should be; then those nobody wants any more.
        for shard in want.values():
            writes += await self._put(shard)
        for name in list(self._written):
            if name not in want:
                writes += await self._delete(name)
        self._warn(left_out)
        if writes:
            log.info(
                "body-based routing: %d ConfigMap writes; %d ConfigMaps map %d served names of %d base models",
                writes,
                len(want),
                sum(len(s.names) for s in want.values()),
                len({s.base_model for s in want.values()}),
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
                self._have.pop(shard.name, None)
                continue
            self._written[shard.name] = result
            self._have[shard.name] = shard.names
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
        self._have.pop(name, None)
        return 1

    def _warn(self, left_out: dict[str, str]) -> None:
        """One Warning Event per adapter when it is left out (again, if the reason changed)."""
        for ref in list(self._warned):
            if ref not in left_out:
                del self._warned[ref]
        for ref, message in left_out.items():
            if self._warned.get(ref) == message:
                continue
            obj = self.reconciler.adapters.get(ref)
            if obj is None:
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
