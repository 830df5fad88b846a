"""Where each adapter's weights live: disk -> CPU (LRU, ``max_cpu_loras``) -> device slots (LRU, ``max_loras``).

Everything is keyed by adapter ID, never by served name, so a new version (new ID) never reuses an
old version's slot or CPU copy. Disk -> CPU runs on a loader thread (a request waits in the queue
meanwhile, and the engine keeps stepping); CPU -> slot runs on the engine thread between steps, one
copy at a time, so it stalls other requests by at most one step. A slot whose adapter running
requests use is never evicted; a request starts only once its adapter is fully in a slot.

Only the engine thread calls this class (the loader thread only produces ``AdapterWeights``).
"""

from __future__ import annotations

import collections
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from loraplane.errors import LoraplaneError, PermanentError

from .metrics import Metrics
from .runner import AdapterWeights, ModelRunner, load_adapter_weights

#: disk -> CPU loads queued at once; requests further back in the queue start theirs later.
PREFETCH_WINDOW = 2


class AdapterTiers:
    """CPU and device residency of adapters, with LRU eviction and use counts per ID."""

    def __init__(self, runner: ModelRunner, *, max_cpu_loras: int, metrics: Metrics) -> None:
        if max_cpu_loras < 1:
            raise PermanentError("InvalidSettings", "max_cpu_loras must be at least 1")
        self.runner = runner
        self.max_cpu_loras = max_cpu_loras
        self.metrics = metrics
        self.cpu: OrderedDict[int, AdapterWeights] = OrderedDict()
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # adapter ID -> slot, least recent first
        self.free_slots = list(range(runner.max_loras))
        self.running: collections.Counter[int] = collections.Counter()  # running sequences per ID
        self.refs: collections.Counter[int] = collections.Counter()  # admitted (waiting + running) per ID
        self.removed: set[int] = set()  # gone from the registry; dropped once refs reach 0
        self.failed: dict[int, LoraplaneError] = {}
        self._loading: dict[int, Future[AdapterWeights]] = {}
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="adapter-loader")

    # -- what the scheduler calls -------------------------------------------------------------

    def ensure(
        self, adapter_id: int, local_dir: Path | None, *, may_copy: bool = True, may_load: bool = True
    ) -> int | None:
        """The slot holding ``adapter_id``, or None while it is on its way (ask again next step).

        ``may_copy`` False: this step already copied an adapter into a slot. ``may_load`` False: do not
        start a disk -> CPU load for it yet (requests nearer the queue's head go first). Raises the
        load error (a ``LoraplaneError``) when the adapter cannot be loaded at all.
        """
        if adapter_id in self.failed:
            raise self.failed[adapter_id]
        slot = self.slot_of.get(adapter_id)
        if slot is not None:
            self.slot_of.move_to_end(adapter_id)
            if adapter_id in self.cpu:  # in use: keep its CPU copy warm for when the slot is reused
                self.cpu.move_to_end(adapter_id)
            return slot
        if not may_load and adapter_id not in self.cpu and adapter_id not in self._loading:
            return None
        weights = self._cpu_copy(adapter_id, local_dir)
        if weights is None or not may_copy:
            return None
        slot = self._take_slot()
        if slot is None:
            return None
        self.runner.set_slot(slot, weights)
        self.slot_of[adapter_id] = slot
        self.metrics.adapter_loads.labels(tier="device").inc()
        return slot

    def slot_free_or_idle(self) -> bool:
        """Whether a copy into a slot could happen now (a free slot, or one no running request uses)."""
        return bool(self.free_slots) or any(self.running[a] <= 0 for a in self.slot_of)

    def drain_victim(self, exclude: set[int]) -> int | None:
        """The resident adapter to stop admitting so a slot frees soonest: fewest running, then LRU."""
        candidates = [a for a in self.slot_of if a not in exclude]
        return min(candidates, key=lambda a: self.running[a], default=None)

    def admit(self, adapter_id: int) -> None:
        """A request for this ID entered the queue: keep the ID's copies until it is done."""
        self.refs[adapter_id] += 1

    def start(self, adapter_id: int) -> None:
        """A sequence on this ID runs: its slot must not be evicted."""
        self.running[adapter_id] += 1

    def pause(self, adapter_id: int) -> None:
        """A sequence on this ID was preempted: it waits again (still queued, not running)."""
        self.running[adapter_id] -= 1
        if self.running[adapter_id] <= 0:
            del self.running[adapter_id]

    def finish(self, adapter_id: int, *, started: bool) -> None:
        """A request for this ID left (finished, cancelled or failed)."""
        if started:
            self.running[adapter_id] -= 1
            if self.running[adapter_id] <= 0:
                del self.running[adapter_id]
        self.refs[adapter_id] -= 1
        if self.refs[adapter_id] <= 0:
            del self.refs[adapter_id]
            if adapter_id in self.removed:
                self._drop(adapter_id)

    def remove(self, adapter_id: int) -> None:
        """The registry no longer serves this ID: drop its copies once no admitted request uses it."""
        self.removed.add(adapter_id)
        if self.refs[adapter_id] <= 0:
            self.refs.pop(adapter_id, None)
            self._drop(adapter_id)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # -- internals ---------------------------------------------------------------------------

    def _cpu_copy(self, adapter_id: int, local_dir: Path | None) -> AdapterWeights | None:
        weights = self.cpu.get(adapter_id)
        if weights is not None:
            self.cpu.move_to_end(adapter_id)
            return weights
        future = self._loading.get(adapter_id)
        if future is None:
            if len(self._loading) >= PREFETCH_WINDOW:
                return None  # more loads at once would only push each other out of the CPU tier
            if local_dir is None:
                raise PermanentError(
                    "AdapterNotPrefetched", f"adapter ID {adapter_id} has no local copy to load from"
                )
            self._loading[adapter_id] = self._pool.submit(self._load, adapter_id, Path(local_dir))
            return None
        if not future.done():
            return None
        del self._loading[adapter_id]
        try:
            weights = future.result()
        except LoraplaneError as exc:
            self.failed[adapter_id] = exc
            raise
        except Exception as exc:  # a corrupt file must fail its requests, not the engine
            self.failed[adapter_id] = PermanentError("AdapterLoadFailed", f"adapter ID {adapter_id}: {exc}")
            raise self.failed[adapter_id] from exc
        self.cpu[adapter_id] = weights
        self.metrics.adapter_loads.labels(tier="cpu").inc()
        while len(self.cpu) > self.max_cpu_loras:
            self.cpu.popitem(last=False)
            self.metrics.adapter_evictions.labels(tier="cpu").inc()
        return weights

    def _load(self, adapter_id: int, local_dir: Path) -> AdapterWeights:
        """Loader thread: read and check the weights (the validator's reader and checks, rank included),
        so a bad adapter never evicts a good one."""
        return load_adapter_weights(
            local_dir, self.runner.config, adapter_id=adapter_id, max_lora_rank=self.runner.lora.max_rank
        )

    def _take_slot(self) -> int | None:
        if self.free_slots:
            return self.free_slots.pop(0)
        for adapter_id, slot in self.slot_of.items():  # least recently used first
            if self.running[adapter_id] <= 0:
                del self.slot_of[adapter_id]
                self.metrics.adapter_evictions.labels(tier="device").inc()
                return slot
        return None  # every slot serves running requests; wait for one to finish

    def _drop(self, adapter_id: int) -> None:
        self.removed.discard(adapter_id)
        self.failed.pop(adapter_id, None)
        self.cpu.pop(adapter_id, None)
        future = self._loading.pop(adapter_id, None)
        if future is not None:
            future.cancel()
        slot = self.slot_of.pop(adapter_id, None)
        if slot is not None:
            self.runner.clear_slot(slot)
            self.free_slots.append(slot)
