"""The worker's local adapter cache: complete, checked copies of adapter files, bounded by bytes.

Entries are keyed by ``ResolvedSource.cache_key`` (source + resolved revision), so an entry never
changes once written. Writes are atomic: files stream into a staging directory under
``<root>/tmp`` (``stage``), then a ``manifest.json`` is written last and the whole directory is
renamed into ``<root>/entries`` (``commit``). A worker killed mid-download therefore leaves only
staging debris, which the next start removes. Downloading into it is prefetch.py's job.

The byte budget is enforced with LRU eviction of entries that are not pinned (pinned = being
served); an adapter that cannot fit without evicting served ones is refused (TooLarge / CacheFull),
never squeezed in. The volume itself may be smaller than the budget, or shared: a write that finds
it full evicts unpinned entries, oldest first (``evict_for_space``). An entry whose adapter then
fails validation leaves the cache (``discard``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import uuid
from collections import Counter as _Counts
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from loraplane.errors import LoraplaneError
from loraplane.worker import provenance, sources
from loraplane.worker.sources import ResolvedSource

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CACHE_FULL = "CacheFull"

CACHE_HITS = Counter("loraplane_worker_cache_hits", "Prefetches and lookups served from the cache")
CACHE_EVICTIONS = Counter(
    "loraplane_worker_cache_evictions", "Entries evicted to stay within the byte budget"
)
CACHE_BYTES = Gauge("loraplane_worker_cache_bytes", "Bytes held by complete cache entries")
CACHE_ENTRIES = Gauge("loraplane_worker_cache_entries", "Complete cache entries")


@dataclass(frozen=True)
class CachedFile:
    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class CacheEntry:
    """A complete cache entry: ``path`` holds adapter_config.json and adapter_model.safetensors (and
    model.sig when the source has one)."""

    cache_key: str
    path: Path
    size_bytes: int
    files: tuple[CachedFile, ...]
    uri: str
    resolved_revision: str

    def sha256(self, name: str = sources.WEIGHTS_FILE) -> str:
        return next(f.sha256 for f in self.files if f.name == name)

    @property
    def file_digests(self) -> dict[str, str]:
        """{name: sha256} of the files spec.digest covers (all but the signature), hashed as they arrived."""
        return {f.name: f.sha256 for f in self.files if f.name in sources.SIGNED_FILES}

    @property
    def digest(self) -> str:
        """The canonical manifest's digest (``sha256:<hex>``, provenance.py), with no second read."""
        return provenance.digest_of(self.file_digests)


class CacheIndex:
    """The complete entries of a byte-bounded, crash-safe adapter cache: LRU order, pins and the byte
    budget. Thread-safe.

    Args:
        root: the cache directory (a volume that may outlive the worker).
        budget_bytes: most bytes held by complete entries.
    """

    def __init__(self, root: Path, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError("budget_bytes must be positive")
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self._entries_dir = self.root / "entries"
        self._tmp_dir = self.root / "tmp"
        self._lock = threading.RLock()
        self._lru = _Entries()  # oldest first
        self._pins: _Counts[str] = _Counts()
        self._reserved = 0  # bytes of downloads in flight
        self._open()

    # --- start-up --------------------------------------------------------------------------------
    def _open(self) -> None:
        """Drop staging debris and incomplete entries left by a crash; load complete ones, oldest first."""
        self._entries_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._tmp_dir, ignore_errors=True)
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        found: list[tuple[float, CacheEntry]] = []
        for d in self._entries_dir.iterdir():
            entry = self.read_entry(d)
            if entry is None:
                log.warning("removing incomplete cache entry %s", d)
                self._discard(d)
                continue
            found.append(((d / MANIFEST).stat().st_mtime, entry))
        for _, entry in sorted(found, key=lambda t: t[0]):
            self._lru[entry.cache_key] = entry
        self._update_gauges()

    def read_entry(self, d: Path) -> CacheEntry | None:
        """The entry in d if its manifest is valid and every file has the recorded size; else None."""
        try:
            data = json.loads((d / MANIFEST).read_text())
            files = tuple(CachedFile(**f) for f in data["files"])
            for f in files:
                if (d / f.name).stat().st_size != f.size:
                    return None
            if data["cache_key"] != d.name:
                return None
            return CacheEntry(
                d.name, d, sum(f.size for f in files), files, data["uri"], data["resolved_revision"]
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    # --- queries ---------------------------------------------------------------------------------
    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._lru.bytes

    def entries(self) -> list[CacheEntry]:
        """Complete entries, least recently used first."""
        with self._lock:
            return list(self._lru.values())

    def lookup(self, cache_key: str, *, pin: bool = False) -> CacheEntry | None:
        """The complete entry for cache_key, with no network; marks it recently used.

        With ``pin`` the entry is pinned in the same step, so no eviction can slip in between."""
        with self._lock:
            entry = self._lru.get(cache_key)
            if entry is None:
                return None
            if not (entry.path / MANIFEST).is_file():  # removed behind our back
                del self._lru[cache_key]
                self._update_gauges()
                return None
            self._lru.move_to_end(cache_key)
            if pin:
                self._pins[cache_key] += 1
        with contextlib.suppress(OSError):  # the manifest's mtime carries LRU order across restarts
            os.utime(entry.path / MANIFEST)
        CACHE_HITS.inc()
        return entry

    # --- pins ------------------------------------------------------------------------------------
    def pin(self, cache_key: str) -> None:
        """Protect an entry from eviction while it is served (pins nest; unpin once per pin)."""
        with self._lock:
            self._pins[cache_key] += 1

    def unpin(self, cache_key: str) -> None:
        with self._lock:
            if self._pins[cache_key] <= 1:
                self._pins.pop(cache_key, None)
            else:
                self._pins[cache_key] -= 1

    def is_pinned(self, cache_key: str) -> bool:
        with self._lock:
            return self._pins[cache_key] > 0

    # --- space -----------------------------------------------------------------------------------
    def reserve(self, resolved: ResolvedSource) -> int:
        """Make room for ``resolved`` by evicting unpinned LRU entries (refused if served ones stand in the
        way); its bytes count as used until ``release``. Returns them."""
        size = resolved.size_bytes
        if size > self.budget_bytes:
            raise LoraplaneError(
                sources.TOO_LARGE,
                f"{resolved.uri} is {size} bytes, larger than the whole cache budget of "
                f"{self.budget_bytes} bytes; raise the worker's cache budget",
                retry=False,
            )
        with self._lock:
            used = self._lru.bytes + self._reserved
            victims: list[CacheEntry] = []
            for key, entry in self._lru.items():  # oldest first
                if used + size <= self.budget_bytes:
                    break
                if self._pins[key] > 0:
                    continue
                victims.append(entry)
                used -= entry.size_bytes
            if used + size > self.budget_bytes:
                raise LoraplaneError(
                    CACHE_FULL,
                    f"{resolved.uri} needs {size} bytes but the cache ({self.budget_bytes} bytes) is held by "
                    "adapters being served; it is retried when one is dropped, or raise the cache budget",
                    retry=True,
                )
            for entry in victims:
                del self._lru[entry.cache_key]
                log.info("evicting %s (%d bytes) from the adapter cache", entry.cache_key, entry.size_bytes)
                CACHE_EVICTIONS.inc()
            self._reserved += size
            self._update_gauges()
        for entry in victims:
            self._discard(entry.path)
        return size

    def release(self, size: int) -> None:
        """A download's reservation ends (its entry is added, or it failed)."""
        with self._lock:
            self._reserved -= size

    def add(self, entry: CacheEntry, *, pin: bool = False) -> None:
        """A complete entry written by ``commit`` joins the index as the most recently used."""
        with self._lock:
            self._lru[entry.cache_key] = entry
            if pin:
                self._pins[entry.cache_key] += 1
            self._lru.move_to_end(entry.cache_key)
            self._update_gauges()

    def served(self) -> int:
        """Entries pinned now (being served)."""
        with self._lock:
            return sum(1 for k in self._lru if self._pins[k] > 0)

    def evict_for_space(self, need: int) -> int:
        """Evict unpinned entries, oldest first, at least one and until ``need`` bytes are free on the
        volume (others may write to it too); how many."""
        evicted = 0
        while not evicted or shutil.disk_usage(self.root).free < need:
            with self._lock:
                key = next((k for k in self._lru if self._pins[k] == 0), None)
                if key is None:
                    break
                entry = self._lru.pop(key)
                self._update_gauges()
            log.info("evicting %s (%d bytes): the cache volume is full", key, entry.size_bytes)
            CACHE_EVICTIONS.inc()
            self._discard(entry.path)
            evicted += 1
        return evicted

    # --- writing ---------------------------------------------------------------------------------
    def stage(self, cache_key: str) -> Path:
        """A new, empty staging directory for an entry's files (under <root>/tmp: removed at start)."""
        stage = self._tmp_dir / f"{cache_key}.{uuid.uuid4().hex[:8]}"
        stage.mkdir(parents=True)
        return stage

    def commit(self, stage: Path, manifest: dict[str, Any]) -> Path:
        """Write the manifest last (its presence means complete) and rename the staged directory into
        entries/ atomically; the entry's directory. Raises OSError."""
        with open(stage / MANIFEST, "w") as out:
            json.dump(manifest, out)
            out.flush()
            os.fsync(out.fileno())
        _fsync_dir(stage)
        final = self._entries_dir / manifest["cache_key"]
        try:
            os.rename(stage, final)
        except OSError:
            if self.read_entry(final) is None:  # a broken leftover: replace it
                self._discard(final)
                os.rename(stage, final)
        _fsync_dir(self._entries_dir)
        return final

    # --- removal ---------------------------------------------------------------------------------
    def remove(self, cache_key: str) -> bool:
        """Drop an entry (pinned or not: the caller decides). True if there was one."""
        with self._lock:
            entry = self._lru.pop(cache_key, None)
            self._update_gauges()
        if entry is None:
            return False
        self._discard(entry.path)
        return True

    def discard(self, cache_key: str) -> bool:
        """Unpin once, and remove the entry unless another holder still pins it: for a version that
        failed validation, whose files nobody can serve. True if it was removed."""
        with self._lock:
            self.unpin(cache_key)
            if self._pins[cache_key] > 0:
                return False
            return self.remove(cache_key)

    def _discard(self, d: Path) -> None:
        """Rename out of entries/ first (atomic), then delete, so no half-deleted entry is ever visible."""
        trash = self._tmp_dir / f"trash-{d.name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(d, trash)
        except OSError:
            trash = d
        shutil.rmtree(trash, ignore_errors=True)

    def _update_gauges(self) -> None:
        CACHE_BYTES.set(self._lru.bytes)
        CACHE_ENTRIES.set(len(self._lru))


class _Entries(OrderedDict[str, CacheEntry]):
    """Entries by cache key, keeping their total size (a sum over every entry per prefetch made one
    adapter's cost grow with the number of adapters)."""

    bytes = 0

    def __setitem__(self, key: str, entry: CacheEntry) -> None:
        old = self.get(key)
        self.bytes += entry.size_bytes - (old.size_bytes if old is not None else 0)
        super().__setitem__(key, entry)

    def __delitem__(self, key: str) -> None:
        self.bytes -= self[key].size_bytes
        super().__delitem__(key)

    def pop(self, key: str, *default: Any) -> Any:  # type: ignore[override]
        if key in self:
            self.bytes -= self[key].size_bytes
        return super().pop(key, *default)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
