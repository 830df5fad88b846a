"""The worker's local adapter cache: complete, checked copies of adapter files, bounded by bytes.

Entries are keyed by ``ResolvedSource.cache_key`` (source + resolved revision), so an entry never
changes once written. Writes are atomic: files stream into a staging directory under
``<root>/tmp`` (sha256 computed while streaming, size and source checksum verified, fsync), then a
``manifest.json`` is written last and the whole directory is renamed into ``<root>/entries``. A
worker killed mid-download therefore leaves only staging debris, which the next start removes.

The byte budget is enforced with LRU eviction of entries that are not pinned (pinned = being
served); an adapter that cannot fit without evicting served ones is refused (TooLarge / CacheFull),
never squeezed in. The volume itself may be smaller than the budget, or shared: a write that finds
it full (ENOSPC, EDQUOT) evicts unpinned entries, oldest first, until the adapter's bytes are free,
and writes again; with nothing left to evict it is CacheFull, naming the volume. Downloads are limited by a semaphore and retried with exponential backoff.

Bad files never become entries: the weights' safetensors header is checked (tensorfile, as the
loader checks it) as soon as its bytes arrive, and a bad one stops the download at once instead of
after gigabytes; so does a header naming a tensor that is no LoRA weight (``peft.foreign_tensor``:
a saved module, new embeddings, DoRA), which validation would refuse. An entry whose adapter then fails validation leaves the cache (``discard``).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import shutil
import threading
import time
import uuid
from collections import Counter as _Counts
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from prometheus_client import Counter, Gauge, Histogram

from loraplane.errors import LoraplaneError, ValidationFailed
from loraplane.worker import provenance, sources
from loraplane.worker.inference import peft, tensorfile
from loraplane.worker.sources import ResolvedSource, SourceSettings

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CACHE_FULL = "CacheFull"
CACHE_WRITE_FAILED = "CacheWriteFailed"
CACHE_CLOSED = "CacheClosed"

PREFETCH_BYTES = Counter(
    "loraplane_worker_prefetch_bytes", "Bytes downloaded into the adapter cache", ["kind"]
)
PREFETCH_SECONDS = Histogram(
    "loraplane_worker_prefetch_seconds",
    "Seconds to download one adapter into the cache (misses only, retries included)",
    ["kind"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
)
PREFETCH_FAILURES = Counter(
    "loraplane_worker_prefetch_failures", "Prefetches that failed after all attempts", ["reason"]
)
CACHE_HITS = Counter("loraplane_worker_cache_hits", "Prefetches and lookups served from the cache")
CACHE_MISSES = Counter("loraplane_worker_cache_misses", "Prefetches that had to download")
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


class AdapterCache:
    """A byte-bounded, crash-safe cache of adapter files. Thread-safe.

    Args:
        root: the cache directory (a volume that may outlive the worker).
        budget_bytes: most bytes held by complete entries.
        max_concurrent_downloads: downloads running at once (others wait).
        max_file_bytes: largest single file accepted, in bytes.
        retries: further attempts after a retryable failure.
        backoff_s: first delay between attempts, in seconds; doubles each time, capped at backoff_max_s.
        sources_settings: how to reach sources (endpoints, tokens, timeouts).
        progress_log_bytes: files at least this large log progress (bytes, %, MB/s) every few seconds.
    """

    def __init__(
        self,
        root: Path,
        budget_bytes: int,
        max_concurrent_downloads: int = 2,
        max_file_bytes: int = 8 << 30,
        retries: int = 4,
        backoff_s: float = 0.5,
        *,
        backoff_max_s: float = 30.0,
        sources_settings: SourceSettings | None = None,
        progress_log_bytes: int = 64 << 20,
        progress_interval_s: float = 5.0,
    ) -> None:
        if budget_bytes <= 0:
            raise ValueError("budget_bytes must be positive")
        if max_concurrent_downloads < 1:
            raise ValueError("max_concurrent_downloads must be at least 1")
        self.root = Path(root)
        self.budget_bytes = budget_bytes
        self.max_file_bytes = max_file_bytes
        self.retries = max(0, retries)
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.settings = sources_settings or SourceSettings()
        self.progress_log_bytes = progress_log_bytes
        self.progress_interval_s = progress_interval_s
        self._entries_dir = self.root / "entries"
        self._tmp_dir = self.root / "tmp"
        self._lock = threading.RLock()
        self._downloads = threading.BoundedSemaphore(max_concurrent_downloads)
        self._key_locks: dict[str, threading.Lock] = {}
        self._lru = _Entries()  # oldest first
        self._pins: _Counts[str] = _Counts()
        self._reserved = 0  # bytes of downloads in flight
        self._closing = threading.Event()
        self._open()

    # --- start-up --------------------------------------------------------------------------------
    def _open(self) -> None:
        """Drop staging debris and incomplete entries left by a crash; load complete ones, oldest first."""
        self._entries_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self._tmp_dir, ignore_errors=True)
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        found: list[tuple[float, CacheEntry]] = []
        for d in self._entries_dir.iterdir():
            entry = self._read_entry(d)
            if entry is None:
                log.warning("removing incomplete cache entry %s", d)
                self._discard(d)
                continue
            found.append(((d / MANIFEST).stat().st_mtime, entry))
        for _, entry in sorted(found, key=lambda t: t[0]):
            self._lru[entry.cache_key] = entry
        self._update_gauges()

    def _read_entry(self, d: Path) -> CacheEntry | None:
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

    # --- prefetch --------------------------------------------------------------------------------
    def prefetch(self, resolved: ResolvedSource, *, pin: bool = False) -> CacheEntry:
        """The complete entry for ``resolved``, downloading it if needed. Blocking, thread-safe.

        With ``pin`` the entry is returned pinned (unpin it when it is no longer served); pinning
        after the call instead leaves a moment in which another prefetch could evict it.

        Raises:
            LoraplaneError: TooLarge or CacheFull when it cannot fit; the source's reason (with
                every attempt counted) when the download fails.
        """
        hit = self.lookup(resolved.cache_key, pin=pin)
        if hit is not None:
            return hit
        with self._lock:
            key_lock = self._key_locks.setdefault(resolved.cache_key, threading.Lock())
        with key_lock:  # one download per key; a second caller waits and then hits
            hit = self.lookup(resolved.cache_key, pin=pin)
            if hit is not None:
                return hit
            CACHE_MISSES.inc()
            size = resolved.size_bytes
            self._reserve(resolved, size)
            started = time.monotonic()
            try:
                self._acquire_download_slot(resolved)
                try:
                    entry = self._download_with_retries(resolved)
                finally:
                    self._downloads.release()
            except LoraplaneError as e:
                PREFETCH_FAILURES.labels(e.reason).inc()
                raise
            finally:
                with self._lock:
                    self._reserved -= size
            PREFETCH_SECONDS.labels(resolved.kind).observe(time.monotonic() - started)
            with self._lock:
                self._lru[entry.cache_key] = entry
                if pin:
                    self._pins[entry.cache_key] += 1
                self._lru.move_to_end(entry.cache_key)
                self._update_gauges()
            return entry

    def close(self) -> None:
        """Stop downloading: downloads in flight end at their next chunk, waits and backoffs end now
        (all with CacheClosed); complete entries stay. For a prompt, clean worker shutdown."""
        self._closing.set()

    def _check_open(self, resolved: ResolvedSource) -> None:
        if self._closing.is_set():
            raise LoraplaneError(CACHE_CLOSED, f"{resolved.uri}: the worker is stopping", retry=True)

    def _acquire_download_slot(self, resolved: ResolvedSource) -> None:
        while not self._downloads.acquire(timeout=0.5):
            self._check_open(resolved)
        try:
            self._check_open(resolved)
        except LoraplaneError:
            self._downloads.release()
            raise

    def _reserve(self, resolved: ResolvedSource, size: int) -> None:
        """Make room for size bytes by evicting unpinned LRU entries; refuse if served ones stand in the way."""
        for f in resolved.files:
            if f.size > self.max_file_bytes:
                raise LoraplaneError(
                    sources.TOO_LARGE,
                    f"{resolved.uri}: {f.name} is {f.size} bytes, above the worker's limit of "
                    f"{self.max_file_bytes} bytes per file",
                    retry=False,
                )
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

    def _download_with_retries(self, resolved: ResolvedSource) -> CacheEntry:
        attempts = self.retries + 1
        last: LoraplaneError | None = None
        for attempt in range(1, attempts + 1):
            try:
                return self._download_making_space(resolved)
            except LoraplaneError as e:
                if e.reason == CACHE_FULL:
                    raise  # only a served adapter leaving helps: the caller retries (the controller)
                last = e
                if not e.retry or attempt == attempts or self._closing.is_set():
                    break
                delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(
                    0.8, 1.2
                )
                log.warning(
                    "prefetch %s failed (attempt %d/%d, retrying in %.1fs): %s",
                    resolved.uri,
                    attempt,
                    attempts,
                    delay,
                    e,
                )
                if self._closing.wait(delay):
                    break
        assert last is not None
        if self._closing.is_set():
            raise LoraplaneError(
                CACHE_CLOSED, f"{resolved.uri}: the worker is stopping", retry=True
            ) from last
        if last.retry:
            raise LoraplaneError(
                last.reason,
                f"{resolved.uri}: gave up after {attempts} attempts; last error: {last.message}",
                retry=True,
            ) from last
        raise last

    def _download_making_space(self, resolved: ResolvedSource) -> CacheEntry:
        """``_download``; when the volume is full, evict what is not served and write again (each
        round evicts at least one entry, so this ends)."""
        while True:
            try:
                return self._download(resolved)
            except LoraplaneError as e:
                cause = e.__cause__
                if not (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)):
                    raise
                if not self._evict_for_space(resolved.size_bytes):
                    with self._lock:
                        served = sum(1 for k in self._lru if self._pins[k] > 0)
                    raise LoraplaneError(
                        CACHE_FULL,
                        f"{resolved.uri} needs {resolved.size_bytes} bytes but the cache volume at {self.root} "
                        f"is full ({cause.strerror}) and holds only adapters being served ({served}); it is "
                        "retried when one is dropped; give the volume more space or set the cache budget "
                        "below its size",
                        retry=True,
                    ) from e
                log.warning("cache volume %s full while writing %s; evicted unserved entries, writing again",
                            self.root, resolved.uri)  # fmt: skip

    def _evict_for_space(self, need: int) -> int:
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

    def _download(self, resolved: ResolvedSource) -> CacheEntry:
        stage = self._tmp_dir / f"{resolved.cache_key}.{uuid.uuid4().hex[:8]}"
        try:
            stage.mkdir(parents=True)
            files: list[CachedFile] = []
            for rf in resolved.files:
                files.append(self._download_file(resolved, rf, stage))
            manifest = {
                "cache_key": resolved.cache_key,
                "kind": resolved.kind,
                "uri": resolved.uri,
                "resolved_revision": resolved.resolved_revision,
                "requested_revision": resolved.requested_revision,
                "files": [f.__dict__ for f in files],
                "created": time.time(),
            }
            with open(stage / MANIFEST, "w") as out:  # written last: its presence means complete
                json.dump(manifest, out)
                out.flush()
                os.fsync(out.fileno())
            _fsync_dir(stage)
            final = self._entries_dir / resolved.cache_key
            try:
                os.rename(stage, final)
            except OSError:
                if self._read_entry(final) is None:  # a broken leftover: replace it
                    self._discard(final)
                    os.rename(stage, final)
            _fsync_dir(self._entries_dir)
        except OSError as e:
            raise LoraplaneError(
                CACHE_WRITE_FAILED,
                f"cannot write {resolved.uri} into the cache at {self.root}: {e.strerror or e}",
                retry=True,
            ) from e
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
        entry = self._read_entry(final)
        if entry is None:
            raise LoraplaneError(
                CACHE_WRITE_FAILED, f"{final} is not a complete entry after writing", retry=True
            )
        return entry

    def _download_file(self, resolved: ResolvedSource, rf: sources.RemoteFile, stage: Path) -> CachedFile:
        progress = (
            _Progress(f"{resolved.uri}/{rf.name}", self.progress_interval_s)
            if (rf.size >= self.progress_log_bytes)
            else None
        )

        with open(
            stage / rf.name, "w+b"
        ) as out:  # readable: the header check and the local copy read it back
            header = _HeaderCheck(out, rf) if rf.name == sources.WEIGHTS_FILE else None

            def on_bytes(done: int, total: int) -> None:
                self._check_open(resolved)  # close() stops a download at its next chunk
                if header is not None:
                    header(done)  # a bad header stops the download here, with its reason
                if progress is not None:
                    progress(done, total)

            fetched = sources.fetch_file(
                resolved, rf.name, out, self.settings, progress=on_bytes, max_bytes=self.max_file_bytes
            )
            out.flush()
            os.fsync(out.fileno())
        PREFETCH_BYTES.labels(resolved.kind).inc(fetched.size)
        if progress is not None:
            progress.done(fetched.size)
        return CachedFile(rf.name, fetched.size, fetched.sha256)

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


class _HeaderCheck:
    """Checks a safetensors file's header once its first bytes are on disk (called with bytes written)."""

    def __init__(self, out: BinaryIO, rf: sources.RemoteFile) -> None:
        self.out, self.fd, self.rf = out, out.fileno(), rf
        self.need: int | None = None  # bytes the header needs, once its length is known
        self.done = False

    def __call__(self, written: int) -> None:
        if self.done or written < 8:
            return
        self.out.flush()  # streamed chunks may still sit in the file object's buffer
        if self.need is None:
            self.need = tensorfile.header_length(os.pread(self.fd, 8, 0), self.rf.name)
        if written >= self.need or written >= self.rf.size:
            prefix = os.pread(self.fd, min(self.need, written), 0)
            header = tensorfile.parse_header(prefix, self.rf.name, self.rf.size)
            self.done = True
            foreign = peft.Problems()
            for key in header.tensors:
                if (problem := peft.foreign_tensor(key)) is not None:
                    foreign.add(*problem)
            if foreign.items:  # validation would refuse it: decide now, not after the rest of the file
                raise ValidationFailed(foreign.all())


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Progress:
    """Logs bytes, percent and MB/s for a large download at most every interval_s seconds."""

    def __init__(self, what: str, interval_s: float) -> None:
        self.what, self.interval_s = what, interval_s
        self.started = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            rate = done / max(now - self.started, 1e-9) / 1e6
            log.info(
                "prefetch %s: %.1f/%.1f MB (%.0f%%) at %.1f MB/s",
                self.what,
                done / 1e6,
                total / 1e6,
                100 * done / max(total, 1),
                rate,
            )

    def done(self, total: int) -> None:
        secs = max(time.monotonic() - self.started, 1e-9)
        log.info(
            "prefetch %s: %.1f MB in %.1fs (%.1f MB/s)", self.what, total / 1e6, secs, total / secs / 1e6
        )
