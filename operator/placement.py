"""Which live workers of its pool hold an adapter: rendezvous hashing with bounded loads and capacity.

An adapter with replicas k > 0 is placed on k live workers of its base model. Every worker gets a
score per adapter, a hash of (adapter uid, worker namespace/name); the adapter goes to the k highest
scores among the workers that have room (highest random weight, HRW). Once placed it stays: a worker
that leaves moves only its own adapters (each to its next-ranked worker with room), one that joins
takes only the adapters that rank it above one of their workers (about N x k / (W + 1)), from their
lowest-ranked worker, and one that comes back gets back the adapters it had (it ranks in their top k
again).

Room: a worker already holding the adapter always has room for it; another one must stay under
  - its own capacity: ``spec.capacity.maxAdapters`` adapters, and ``spec.capacity.cacheBytes`` bytes
    of placed adapters (each adapter's ``status.adapter.sizeBytes``, or the mean of the known sizes
    while none is known yet): a full worker is skipped, with the reason in status.placement, never
    over-filled;
  - the bounded load: ``BOUND_FACTOR`` x the pool's mean placements per live worker, so the spread
    stays even when hashes bunch up (consistent hashing with bounded loads, Mirrokni et al. 2018).

Demand: an adapter whose requests wait on its workers gets more replicas, up to the pool's
``maxReplicas``; see ``Demand``. Everything here is pure or in-memory; the reconciler feeds it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field

BOUND_FACTOR = 1.25  # most placements on one worker, relative to the pool's mean (bounded loads)

PLACED = "Placed"
MOVED = "Moved"
NOT_ENOUGH_WORKERS = "NotEnoughWorkers"
NO_CAPACITY = "InsufficientCapacity"
SCALED_UP = "ScaledUp"
SCALED_DOWN = "ScaledDown"


def score(uid: str, worker: str) -> int:
    """The rendezvous weight of ``worker`` for the adapter ``uid`` (64 bits of blake2b: fast, even)."""
    digest = hashlib.blake2b(f"{uid}\0{worker}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def ranking(uid: str, workers: Iterable[str]) -> list[str]:
    """``workers`` by their weight for ``uid``, highest first (ties, never seen in practice, by name)."""
    return sorted(workers, key=lambda w: (-score(uid, w), w))


@dataclass(frozen=True)
class Capacity:
    """What one live worker accepts, from its LoRAWorker spec (0: no limit of that kind)."""

    max_adapters: int = 0
    cache_bytes: int = 0


@dataclass
class Loads:
    """Adapters placed per worker (count and bytes), kept from every adapter's status.placement."""

    count: dict[str, int] = field(default_factory=dict)
    bytes: dict[str, int] = field(default_factory=dict)
    of: dict[str, tuple[tuple[str, ...], int]] = field(default_factory=dict)  # adapter -> (workers, size)
    sizes: dict[str, int] = field(default_factory=dict)  # adapter -> known sizeBytes
    _size_sum: int = 0

    def set(self, adapter: str, workers: Iterable[str], size: int) -> None:
        self.drop(adapter)
        placed = tuple(workers)
        if not placed:
            return
        self.of[adapter] = (placed, size)
        for w in placed:
            self.count[w] = self.count.get(w, 0) + 1
            self.bytes[w] = self.bytes.get(w, 0) + size

    def drop(self, adapter: str) -> None:
        placed, size = self.of.pop(adapter, ((), 0))
        for w in placed:
            self.count[w] -= 1
            self.bytes[w] -= size
            if not self.count[w]:
                del self.count[w], self.bytes[w]

    def know_size(self, adapter: str, size: int | None) -> None:
        """Record an adapter's size as the workers found it (None: unknown, or the adapter is gone)."""
        self._size_sum -= self.sizes.pop(adapter, 0)
        if size:
            self.sizes[adapter] = size
            self._size_sum += size

    def size_of(self, adapter: str) -> int:
        """Its known size, else the mean of the known sizes (0 while none is known)."""
        known = self.sizes.get(adapter)
        if known is not None:
            return known
        return self._size_sum // len(self.sizes) if self.sizes else 0

    def placed_on(self, adapter: str) -> tuple[str, ...]:
        return self.of.get(adapter, ((), 0))[0]


def full_reason(worker: str, cap: Capacity, loads: Loads, size: int) -> str | None:
    """Why ``worker`` has no room for one more adapter of ``size`` bytes (None: it has)."""
    count, used = loads.count.get(worker, 0), loads.bytes.get(worker, 0)
    if cap.max_adapters and count >= cap.max_adapters:
        return f"{worker} holds {count} of its {cap.max_adapters} adapters (--max-adapters)"
    if cap.cache_bytes and used + size > cap.cache_bytes:
        return f"{worker} has {used} of {cap.cache_bytes} cache bytes placed, {size} more do not fit (--cache-bytes)"
    return None


@dataclass(frozen=True)
class Decision:
    workers: tuple[str, ...]  # in rank order
    reason: str
    message: str
    full: tuple[str, ...] = ()  # why each skipped full worker was skipped


def place(
    adapter: str,
    uid: str,
    replicas: int,
    pool: dict[str, Capacity],
    loads: Loads,
    *,
    joined: Iterable[str] = (),
) -> Decision:
    """The ``replicas`` workers of ``pool`` (live workers -> capacity) for one adapter, HRW with room.

    ``loads`` holds every adapter's current placement, this one's included (it is not counted against
    the workers that already hold it). The live workers that hold it keep it, so a reconcile for any
    other reason moves nothing; ``joined``: workers that came and may take it from its lowest-ranked
    workers (where they rank above them), so a worker joining moves adapters onto itself only."""
    held = set(loads.placed_on(adapter))
    size = loads.size_of(adapter)
    others = sum(loads.count.get(w, 0) for w in pool) - len(held & pool.keys())
    bound = math.ceil(BOUND_FACTOR * (others + replicas) / max(len(pool), 1))
    order = ranking(uid, pool)
    newcomers = set(joined) - held
    chosen: list[str] = []
    full: list[str] = []
    for candidates in ([w for w in order if w in held or w in newcomers], order):
        for w in candidates:
            if len(chosen) == replicas:
                break
            if w in chosen:
                continue
            if w not in held:
                why = full_reason(w, pool[w], loads, size)
                if why is not None:
                    if why not in full:
                        full.append(why)
                    continue
                if loads.count.get(w, 0) >= bound:
                    continue  # balanced onto the next-ranked worker
            chosen.append(w)
    chosen.sort(key=order.index)
    if len(chosen) < replicas and full:
        reason = NO_CAPACITY
        message = f"placed on {len(chosen)} of {replicas} workers; full: " + "; ".join(full)
    elif len(chosen) < replicas:
        reason = NOT_ENOUGH_WORKERS
        message = f"placed on {len(chosen)} of {replicas} workers: the pool has {len(pool)} live workers"
    else:
        reason, message = PLACED, f"placed on {', '.join(chosen)}"
    return Decision(tuple(chosen), reason, message, tuple(full))


def moves_to(uid: str, placed: list[str], replicas: int, joined: str) -> bool:
    """Whether an adapter placed on ``placed`` would take the worker ``joined`` that just came (it ranks
    it above one of its workers, or it is short of replicas): only those are reconsidered."""
    if len(placed) < replicas:
        return True
    mine = score(uid, joined)
    return any(mine > score(uid, w) for w in placed)


def why_moved(old: Iterable[str], new: Iterable[str], live: set[str]) -> str:
    """One line naming what moved and why: a worker gone, or a better-ranked one that came."""
    gone = [w for w in old if w not in new]
    came = [w for w in new if w not in old]
    parts = []
    if gone:
        parts.append(
            "from "
            + ", ".join(
                f"{w} ({'not live' if w not in live else 'a better-ranked worker came'})" for w in gone
            )
        )
    if came:
        parts.append("to " + ", ".join(came))
    return "moved " + " ".join(parts)


@dataclass
class _Pressure:
    high_since: float | None = None
    quiet_since: float | None = None


class Demand:
    """Replicas added by demand, per adapter, with hysteresis.

    The metric: requests waiting for the adapter (queued, not yet running) as its workers report them
    in their LoRAWorker (``status.waiting``), summed over its workers. The rule: when waiting per
    replica stays at or above ``up_waiting`` for ``up_s`` seconds, one replica is added (up to the
    pool's maxReplicas), and the clock starts again; when nothing waits for ``down_s`` (longer), one
    added replica is given back. Between the two nothing changes, so a load that hovers
    around the threshold never flaps."""

    def __init__(self, up_waiting: int, up_s: float, down_s: float) -> None:
        self.up_waiting, self.up_s, self.down_s = up_waiting, up_s, down_s
        self._pressure: dict[str, _Pressure] = {}

    def step(self, adapter: str, waiting: int, replicas: int, extra: int, room: int, now: float) -> int:
        """The extra replicas ``adapter`` should have now (``extra``: what it has; ``room``: how many more
        the pool allows)."""
        p = self._pressure.setdefault(adapter, _Pressure())
        if waiting >= self.up_waiting * max(replicas, 1):
            p.quiet_since = None
            if p.high_since is None:
                p.high_since = now
            elif now - p.high_since >= self.up_s and room > 0:
                p.high_since = now
                return extra + 1
            return extra
        p.high_since = None
        if waiting > 0:
            p.quiet_since = None
            return extra
        if p.quiet_since is None:
            p.quiet_since = now
        elif extra > 0 and now - p.quiet_since >= self.down_s:
            p.quiet_since = now
            return extra - 1
        if extra == 0 and p.high_since is None:
            self._pressure.pop(adapter, None)  # nothing to remember
        return extra

    def tracked(self) -> set[str]:
        """Adapters whose clocks run (their demand was high or they are waiting out a quiet window)."""
        return set(self._pressure)

    def forget(self, adapter: str) -> None:
        self._pressure.pop(adapter, None)
