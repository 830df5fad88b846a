"""Downloading adapter versions into the worker's cache (cache.py holds the entries).

Files stream into the index's staging directory with their sha256 computed while streaming, size and
source checksum verified and fsync'd; the index then commits the entry atomically. Downloads are
limited by a semaphore and retried with exponential backoff. A write that finds the volume full
(ENOSPC, EDQUOT) has the index evict unpinned entries, oldest first, until the adapter's bytes are
free, and writes again; with nothing left to evict it is CacheFull, naming the volume.

Bad files never become entries: the weights' safetensors header is checked (tensorfile, as the
loader checks it) as soon as its bytes arrive, and a bad one stops the download at once instead of
after gigabytes; so does a header naming a tensor that is no LoRA weight (``peft.foreign_tensor``:
a saved module, new embeddings, DoRA), which validation would refuse.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import threading
import time
from pathlib import Path
from typing import BinaryIO

from prometheus_client import Counter, Histogram

from loraplane.errors import LoraplaneError, ValidationFailed
from loraplane.worker import sources
from loraplane.worker.cache import CACHE_FULL, CachedFile, CacheEntry, CacheIndex
from loraplane.worker.inference import peft, tensorfile
from loraplane.worker.sources import ResolvedSource, SourceSettings

log = logging.getLogger("loraplane.worker.cache")  # the cache's log, as before the split: what operators grep

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
CACHE_MISSES = Counter("loraplane_worker_cache_misses", "Prefetches that had to download")


class Prefetcher:
    """Downloads adapter versions into a ``CacheIndex``: one download per key, a bounded number at once,
    retries with backoff. Thread-safe.

    Args:
        index: the cache the entries join.
        max_concurrent_downloads: downloads running at once (others wait).
        max_file_bytes: largest single file accepted, in bytes.
        retries: further attempts after a retryable failure.
        backoff_s: first delay between attempts, in seconds; doubles each time, capped at backoff_max_s.
        sources_settings: how to reach sources (endpoints, tokens, timeouts).
        progress_log_bytes: files at least this large log progress (bytes, %, MB/s) every few seconds.
    """

    def __init__(
        self,
        index: CacheIndex,
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
        if max_concurrent_downloads < 1:
            raise ValueError("max_concurrent_downloads must be at least 1")
        self.index = index
        self.max_file_bytes = max_file_bytes
        self.retries = max(0, retries)
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.settings = sources_settings or SourceSettings()
        self.progress_log_bytes = progress_log_bytes
        self.progress_interval_s = progress_interval_s
        self._lock = threading.Lock()
        self._downloads = threading.BoundedSemaphore(max_concurrent_downloads)
        self._key_locks: dict[str, threading.Lock] = {}
        self._closing = threading.Event()

    # --- prefetch --------------------------------------------------------------------------------
    def prefetch(self, resolved: ResolvedSource, *, pin: bool = False) -> CacheEntry:
        """The complete entry for ``resolved``, downloading it if needed. Blocking, thread-safe.

        With ``pin`` the entry is returned pinned (unpin it when it is no longer served); pinning
        after the call instead leaves a moment in which another prefetch could evict it.

        Raises:
            LoraplaneError: TooLarge or CacheFull when it cannot fit; the source's reason (with
                every attempt counted) when the download fails.
        """
        hit = self.index.lookup(resolved.cache_key, pin=pin)
        if hit is not None:
            return hit
        with self._lock:
            key_lock = self._key_locks.setdefault(resolved.cache_key, threading.Lock())
        with key_lock:  # one download per key; a second caller waits and then hits
            hit = self.index.lookup(resolved.cache_key, pin=pin)
            if hit is not None:
                return hit
            CACHE_MISSES.inc()
            self._check_file_sizes(resolved)
            size = self.index.reserve(resolved)
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
                self.index.release(size)
            PREFETCH_SECONDS.labels(resolved.kind).observe(time.monotonic() - started)
            self.index.add(entry, pin=pin)
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

    def _check_file_sizes(self, resolved: ResolvedSource) -> None:
        for f in resolved.files:
            if f.size > self.max_file_bytes:
                raise LoraplaneError(
                    sources.TOO_LARGE,
                    f"{resolved.uri}: {f.name} is {f.size} bytes, above the worker's limit of "
                    f"{self.max_file_bytes} bytes per file",
                    retry=False,
                )

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
                if not self.index.evict_for_space(resolved.size_bytes):
                    served = self.index.served()
                    raise LoraplaneError(
                        CACHE_FULL,
                        f"{resolved.uri} needs {resolved.size_bytes} bytes but the cache volume at {self.index.root} "
                        f"is full ({cause.strerror}) and holds only adapters being served ({served}); it is "
                        "retried when one is dropped; give the volume more space or set the cache budget "
                        "below its size",
                        retry=True,
                    ) from e
                log.warning("cache volume %s full while writing %s; evicted unserved entries, writing again",
                            self.index.root, resolved.uri)  # fmt: skip

    def _download(self, resolved: ResolvedSource) -> CacheEntry:
        try:
            stage = self.index.stage(resolved.cache_key)
        except OSError as e:
            raise self._write_failed(resolved, e) from e
        try:
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
            final = self.index.commit(stage, manifest)
        except OSError as e:
            raise self._write_failed(resolved, e) from e
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
        entry = self.index.read_entry(final)
        if entry is None:
            raise LoraplaneError(
                CACHE_WRITE_FAILED, f"{final} is not a complete entry after writing", retry=True
            )
        return entry

    def _write_failed(self, resolved: ResolvedSource, e: OSError) -> LoraplaneError:
        return LoraplaneError(
            CACHE_WRITE_FAILED,
            f"cannot write {resolved.uri} into the cache at {self.index.root}: {e.strerror or e}",
            retry=True,
        )

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
