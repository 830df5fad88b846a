"""The adapter cache: atomic entries, byte budget with LRU of unpinned entries, retries, crash safety."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import REGISTRY
from safetensors.numpy import load_file, save_file
from support import adapters, servers

from loraplane.errors import LoraplaneError
from loraplane.worker import cache as c
from loraplane.worker import sources as s
from loraplane.worker.prefetch import CACHE_CLOSED, Prefetcher
from loraplane.worker.sources import refs

hf_hub = servers.hf_hub


def _metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _local(root: Path, name: str, settings: s.SourceSettings, **kw: Any) -> s.ResolvedSource:
    return s.resolve(str(adapters.write_adapter(root / name, **kw)), None, settings)


def _pad(n_floats: int) -> dict[str, tuple[int, ...]]:
    return {"pad.lora_A.weight": (n_floats,)}  # bulk, so sizes are predictable in budget tests


# --- entries ---------------------------------------------------------------------------------------
def test_prefetch_then_hit(tmp_path: Path, root: Path, settings: s.SourceSettings) -> None:
    r = _local(root, "a", settings)
    cache = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings)
    hits, misses = (
        _metric("loraplane_worker_cache_hits_total"),
        _metric("loraplane_worker_cache_misses_total"),
    )
    loaded = _metric("loraplane_worker_prefetch_bytes_total", kind="local")
    entry = cache.prefetch(r)
    assert entry.path == tmp_path / "cache" / "entries" / r.cache_key and entry.size_bytes == r.size_bytes
    assert json.loads((entry.path / c.MANIFEST).read_text())["resolved_revision"] == r.resolved_revision
    assert cache.prefetch(r) == entry
    assert _metric("loraplane_worker_cache_misses_total") == misses + 1
    assert _metric("loraplane_worker_cache_hits_total") == hits + 1
    assert _metric("loraplane_worker_prefetch_bytes_total", kind="local") == loaded + r.size_bytes
    assert _metric("loraplane_worker_cache_bytes") == cache.index.used_bytes == r.size_bytes


def test_restart_with_the_volume_kept_downloads_nothing(
    tmp_path: Path, root: Path, settings: s.SourceSettings
) -> None:
    r = _local(root, "a", settings)
    Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings).prefetch(r)
    for p in (root / "a").iterdir():  # the source is gone: any read of it would fail
        p.unlink()
    restarted = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings)
    assert restarted.index.lookup(r.cache_key) is not None
    assert restarted.prefetch(r).cache_key == r.cache_key


def test_start_removes_debris_and_incomplete_entries(
    tmp_path: Path, root: Path, settings: s.SourceSettings
) -> None:
    cache_root = tmp_path / "cache"
    good = Prefetcher(c.CacheIndex(cache_root, 1 << 30), sources_settings=settings).prefetch(
        _local(root, "a", settings)
    )
    (cache_root / "tmp" / "x.1234").mkdir(parents=True)
    (cache_root / "tmp" / "x.1234" / "adapter_model.safetensors").write_bytes(b"half")
    no_manifest = cache_root / "entries" / "local-no-manifest"
    no_manifest.mkdir()
    (no_manifest / "adapter_config.json").write_text("{}")
    wrong_size = cache_root / "entries" / "local-wrong-size"
    wrong_size.mkdir()
    (wrong_size / c.MANIFEST).write_text(json.dumps({
        "cache_key": "local-wrong-size", "uri": "file:///x", "resolved_revision": "r",
        "files": [{"name": "adapter_model.safetensors", "size": 100, "sha256": "0" * 64}],
    }))  # fmt: skip
    (wrong_size / "adapter_model.safetensors").write_bytes(b"short")
    cache = Prefetcher(c.CacheIndex(cache_root, 1 << 30), sources_settings=settings)
    assert [e.cache_key for e in cache.index.entries()] == [good.cache_key]
    assert list((cache_root / "tmp").iterdir()) == []
    assert sorted(p.name for p in (cache_root / "entries").iterdir()) == [good.cache_key]


# --- budget ----------------------------------------------------------------------------------------
def test_lru_eviction_of_unpinned_entries(tmp_path: Path, root: Path, settings: s.SourceSettings) -> None:
    a, b, x = (_local(root, n, settings, extra_tensors=_pad(25_000)) for n in ("a", "b", "x"))
    cache = Prefetcher(c.CacheIndex(tmp_path / "cache", a.size_bytes * 2 + 1000), sources_settings=settings)
    evicted = _metric("loraplane_worker_cache_evictions_total")
    cache.prefetch(a)
    cache.prefetch(b)
    cache.index.lookup(a.cache_key)  # a is now the most recently used
    cache.prefetch(x)
    assert [e.cache_key for e in cache.index.entries()] == [a.cache_key, x.cache_key]
    assert not (tmp_path / "cache" / "entries" / b.cache_key).exists()
    assert _metric("loraplane_worker_cache_evictions_total") == evicted + 1
    assert cache.index.used_bytes <= cache.index.budget_bytes


def test_served_adapters_are_never_evicted(tmp_path: Path, root: Path, settings: s.SourceSettings) -> None:
    a, b, x = (_local(root, n, settings, extra_tensors=_pad(25_000)) for n in ("a", "b", "x"))
    cache = Prefetcher(c.CacheIndex(tmp_path / "cache", a.size_bytes * 2 + 1000), sources_settings=settings)
    for r in (a, b):
        cache.prefetch(r)
        cache.index.pin(r.cache_key)
    with pytest.raises(LoraplaneError) as e:
        cache.prefetch(x)
    assert e.value.reason == c.CACHE_FULL and e.value.retry and "being served" in e.value.message
    assert {en.cache_key for en in cache.index.entries()} == {a.cache_key, b.cache_key}
    cache.index.unpin(b.cache_key)
    cache.prefetch(x)
    assert {en.cache_key for en in cache.index.entries()} == {a.cache_key, x.cache_key}


def test_too_large_for_the_budget_or_the_file_limit(
    tmp_path: Path, root: Path, settings: s.SourceSettings
) -> None:
    r = _local(root, "a", settings, extra_tensors=_pad(25_000))
    with pytest.raises(LoraplaneError) as e:
        Prefetcher(c.CacheIndex(tmp_path / "c1", r.size_bytes - 1), sources_settings=settings).prefetch(r)
    assert e.value.reason == s.TOO_LARGE and "cache budget" in e.value.message and not e.value.retry
    with pytest.raises(LoraplaneError) as e:
        Prefetcher(
            c.CacheIndex(tmp_path / "c2", 1 << 30), max_file_bytes=50_000, sources_settings=settings
        ).prefetch(r)
    assert e.value.reason == s.TOO_LARGE and "adapter_model.safetensors" in e.value.message


# --- downloads -------------------------------------------------------------------------------------
def _hub_repo(hub: Any, tmp_path: Path, name: str, **kw: Any) -> str:
    repo = f"team/{name}"
    hub.add_commit(repo, adapters.write_adapter(tmp_path / "src" / name, **kw))
    return repo


def _hub_settings(hub: Any) -> s.SourceSettings:
    return s.SourceSettings(hf_endpoint=hub.url, timeout_s=10)


def test_one_download_per_key_under_concurrency(tmp_path: Path, hf_hub: Any) -> None:
    settings = _hub_settings(hf_hub)
    r = s.resolve(_hub_repo(hf_hub, tmp_path, "a", extra_tensors=_pad(100_000)), None, settings)
    hf_hub.chunk_delay_s = 0.01
    cache = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings)
    results: list[c.CacheEntry] = []
    threads = [threading.Thread(target=lambda: results.append(cache.prefetch(r))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 4 and len({e.path for e in results}) == 1
    assert len(hf_hub.file_gets()) == 2


@pytest.mark.parametrize("limit", [1, 2])
def test_concurrent_downloads_are_limited(tmp_path: Path, hf_hub: Any, limit: int) -> None:
    settings = _hub_settings(hf_hub)
    rs = [
        s.resolve(_hub_repo(hf_hub, tmp_path, f"a{i}", extra_tensors=_pad(50_000)), None, settings)
        for i in range(4)
    ]
    hf_hub.chunk_delay_s = 0.01
    cache = Prefetcher(
        c.CacheIndex(tmp_path / "cache", 1 << 30), max_concurrent_downloads=limit, sources_settings=settings
    )
    threads = [threading.Thread(target=cache.prefetch, args=(r,)) for r in rs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(cache.index.entries()) == 4 and hf_hub.max_active == limit


@pytest.mark.parametrize(
    ("damage", "reason", "fragment"),
    [
        (lambda w: w.write_bytes(w.read_bytes() + bytes(64 << 20)), "MalformedWeights", "file not fully covered"),
        (lambda w: w.write_bytes((1 << 40).to_bytes(8, "little") + bytes(64 << 20)), "HeaderTooLarge", "limit"),
        (lambda w: w.write_bytes((4).to_bytes(8, "little") + b"[1]}" + bytes(64 << 20)), "MalformedWeights",
         "not a JSON object"),
        # a well-formed file whose header names a saved full module (64 MiB): validation refuses it anyway
        (lambda w: save_file({**load_file(w), "base_model.model.model.layers.0.mlp.down_proj.weight":
                              np.zeros(16 << 20, np.float32)}, str(w)), "ModulesToSaveNotSupported", "not a LoRA weight"),
    ],
    ids=["bytes-after-the-last-tensor", "enormous-header", "header-not-an-object", "a-non-lora-tensor"],
)  # fmt: skip
def test_a_bad_header_stops_the_download_and_leaves_nothing(
    tmp_path: Path, hf_hub: Any, damage, reason: str, fragment: str
) -> None:
    """The issue's case: a bad safetensors header was found only after the whole file was downloaded
    (2 GB: 40 s and 2 GB of cache). Now the download stops once the header's bytes are in; also when
    the header is sound but names a tensor no LoRA adapter has (issue 18: 300 MB downloaded first)."""
    src = adapters.write_adapter(tmp_path / "src")
    damage(src / "adapter_model.safetensors")
    size = (src / "adapter_model.safetensors").stat().st_size
    hf_hub.add_commit("team/bad", src)
    settings = _hub_settings(hf_hub)
    cache = Prefetcher(
        c.CacheIndex(tmp_path / "cache", 1 << 30), retries=2, backoff_s=0.01, sources_settings=settings
    )
    with pytest.raises(LoraplaneError) as e:
        cache.prefetch(s.resolve("team/bad", None, settings))
    assert (e.value.reason, e.value.retry) == (reason, False) and fragment in e.value.message, e.value
    for _ in range(500):  # bounded: the server notices the closed connection
        if hf_hub.active == 0:
            break
        time.sleep(0.01)
    print(f"bad header: {hf_hub.bytes_sent} of {size} bytes sent before the download stopped")
    assert hf_hub.bytes_sent < size // 4, (hf_hub.bytes_sent, size)  # stopped early, and not retried
    assert len(hf_hub.file_gets()) == 2 and cache.index.entries() == []
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []  # no staging left behind


def test_discard_removes_a_failed_entry_unless_another_holder_pins_it(
    tmp_path: Path, root: Path, settings: s.SourceSettings
) -> None:
    r = _local(root, "a", settings)
    cache = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings)
    entry = cache.prefetch(r, pin=True)
    cache.index.pin(entry.cache_key)  # a second version with the same files, still served
    assert not cache.index.discard(entry.cache_key) and cache.index.lookup(entry.cache_key) == entry
    assert cache.index.discard(entry.cache_key) and cache.index.entries() == [] and not entry.path.exists()


def test_retries_with_backoff_then_success(tmp_path: Path, hf_hub: Any) -> None:
    settings = _hub_settings(hf_hub)
    r = s.resolve(_hub_repo(hf_hub, tmp_path, "a"), None, settings)
    hf_hub.fail_next = 2
    cache = Prefetcher(
        c.CacheIndex(tmp_path / "cache", 1 << 30), retries=3, backoff_s=0.01, sources_settings=settings
    )
    assert cache.prefetch(r).cache_key == r.cache_key
    assert len(hf_hub.file_gets()) == 2 + 2


def test_final_error_names_the_source_and_the_attempts(tmp_path: Path, hf_hub: Any) -> None:
    settings = _hub_settings(hf_hub)
    r = s.resolve(_hub_repo(hf_hub, tmp_path, "a"), None, settings)
    hf_hub.fail_next = 1000
    failures = _metric("loraplane_worker_prefetch_failures_total", reason=s.SOURCE_UNREACHABLE)
    cache = Prefetcher(
        c.CacheIndex(tmp_path / "cache", 1 << 30), retries=2, backoff_s=0.01, sources_settings=settings
    )
    with pytest.raises(LoraplaneError) as e:
        cache.prefetch(r)
    assert e.value.reason == s.SOURCE_UNREACHABLE and e.value.retry
    assert "hf://team/a: gave up after 3 attempts" in e.value.message and "503" in e.value.message
    assert _metric("loraplane_worker_prefetch_failures_total", reason=s.SOURCE_UNREACHABLE) == failures + 1
    assert cache.index.entries() == [] and list((tmp_path / "cache" / "tmp").iterdir()) == []


def test_corrupted_bytes_fail_the_checksum(tmp_path: Path, hf_hub: Any) -> None:
    settings = _hub_settings(hf_hub)
    r = s.resolve(_hub_repo(hf_hub, tmp_path, "a"), None, settings)
    stored = hf_hub.commits["team/a"][r.resolved_revision]["adapter_model.safetensors"].path
    data = bytearray(stored.read_bytes())
    data[-1] ^= 0xFF  # same size, one flipped byte
    stored.write_bytes(bytes(data))
    cache = Prefetcher(
        c.CacheIndex(tmp_path / "cache", 1 << 30), retries=1, backoff_s=0.01, sources_settings=settings
    )
    with pytest.raises(LoraplaneError) as e:
        cache.prefetch(r)
    assert e.value.reason == s.CHECKSUM_MISMATCH and "gave up after 2 attempts" in e.value.message
    assert cache.index.entries() == []


def test_unreachable_s3_gives_up_with_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    settings = s.SourceSettings(s3_endpoint_url=servers.closed_url(), timeout_s=1)
    r = s.ResolvedSource("s3", "s3://bucket/a", "r1", (s.RemoteFile("adapter_config.json", 10, "e"),),
                         refs.cache_key_for("s3", "s3://bucket/a", "r1"))  # fmt: skip
    cache = Prefetcher(
        c.CacheIndex(tmp_path / "cache", 1 << 30), retries=1, backoff_s=0.01, sources_settings=settings
    )
    with pytest.raises(LoraplaneError) as e:
        cache.prefetch(r)
    assert (
        e.value.reason == s.SOURCE_UNREACHABLE
        and "s3://bucket/a: gave up after 2 attempts" in e.value.message
    )


def test_progress_is_logged_for_large_downloads(
    tmp_path: Path, hf_hub: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings = _hub_settings(hf_hub)
    r = s.resolve(_hub_repo(hf_hub, tmp_path, "a", extra_tensors=_pad(100_000)), None, settings)
    hf_hub.chunk_delay_s = 0.01
    cache = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings, progress_log_bytes=100_000, progress_interval_s=0.0)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="loraplane.worker.cache"):
        cache.prefetch(r)
    lines = [m for m in caplog.messages if "adapter_model.safetensors" in m]
    assert any("%" in m and "MB/s" in m for m in lines) and any(" in " in m for m in lines)
    assert not any("adapter_config.json" in m for m in caplog.messages)  # small files stay quiet


# --- a worker killed mid-download ------------------------------------------------------------------
_KILLED_PREFETCH = """
import sys
from pathlib import Path
from loraplane.worker import cache, prefetch, sources
settings = sources.SourceSettings(hf_endpoint=sys.argv[1], timeout_s=30)
r = sources.resolve("team/big", None, settings)
prefetch.Prefetcher(cache.CacheIndex(Path(sys.argv[2]), 1 << 30), sources_settings=settings).prefetch(r)
print("finished")
"""


def test_sigkill_mid_download_leaves_no_complete_entry(tmp_path: Path, hf_hub: Any) -> None:
    _hub_repo(hf_hub, tmp_path, "big", extra_tensors=_pad(500_000))  # ~2 MB, served slowly
    hf_hub.chunk_bytes, hf_hub.chunk_delay_s = 16 << 10, 0.05
    cache_root = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PREFETCH, hf_hub.url, str(cache_root)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        staged = cache_root / "tmp"
        while time.monotonic() < deadline:  # wait until the weights are half-written
            parts = list(staged.glob("*/adapter_model.safetensors")) if staged.exists() else []
            if parts and parts[0].stat().st_size > 200_000:
                break
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.05)
        else:
            pytest.fail("the download never started")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.stderr.close()  # type: ignore[union-attr]
    assert proc.returncode == -signal.SIGKILL
    assert not (cache_root / "entries").exists() or list((cache_root / "entries").iterdir()) == []

    hf_hub.chunk_delay_s = 0.0
    settings = _hub_settings(hf_hub)
    r = s.resolve("team/big", None, settings)
    cache = Prefetcher(c.CacheIndex(cache_root, 1 << 30), sources_settings=settings)
    assert cache.index.entries() == [] and cache.index.lookup(r.cache_key) is None
    assert list((cache_root / "tmp").iterdir()) == []  # the half-written file is gone
    entry = cache.prefetch(r)
    expected = (tmp_path / "src" / "big" / "adapter_model.safetensors").read_bytes()
    assert (entry.path / "adapter_model.safetensors").read_bytes() == expected


def test_prefetch_can_return_the_entry_already_pinned(
    tmp_path: Path, root: Path, settings: s.SourceSettings
) -> None:
    a, b = (_local(root, n, settings, extra_tensors=_pad(25_000)) for n in ("a", "b"))
    cache = Prefetcher(c.CacheIndex(tmp_path / "cache", a.size_bytes + 1000), sources_settings=settings)
    cache.prefetch(a, pin=True)
    assert cache.index.is_pinned(a.cache_key)
    with pytest.raises(LoraplaneError) as e:
        cache.prefetch(b)
    assert e.value.reason == c.CACHE_FULL
    cache.index.unpin(a.cache_key)
    assert cache.prefetch(b, pin=True).cache_key == b.cache_key and not cache.index.lookup(a.cache_key)
    assert cache.prefetch(b, pin=True) and cache.index.is_pinned(b.cache_key)
    cache.index.unpin(b.cache_key)
    assert cache.index.is_pinned(b.cache_key)  # pins nest
    cache.index.unpin(b.cache_key)
    assert not cache.index.is_pinned(b.cache_key)


def test_lru_order_survives_a_restart(tmp_path: Path, root: Path, settings: s.SourceSettings) -> None:
    a, b = (_local(root, n, settings) for n in ("a", "b"))
    cache = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings)
    cache.prefetch(a)
    cache.prefetch(b)
    manifest = tmp_path / "cache" / "entries" / a.cache_key / c.MANIFEST
    os.utime(manifest, (time.time() + 5, time.time() + 5))  # as if a was used later (clock-coarseness-proof)
    restarted = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings)
    assert [e.cache_key for e in restarted.index.entries()] == [b.cache_key, a.cache_key]
    restarted.index.lookup(b.cache_key)
    assert os.stat(tmp_path / "cache" / "entries" / b.cache_key / c.MANIFEST).st_mtime > time.time() - 5


def test_close_stops_a_download_in_flight_promptly(tmp_path: Path, hf_hub: Any) -> None:
    settings = _hub_settings(hf_hub)
    r = s.resolve(_hub_repo(hf_hub, tmp_path, "slow", extra_tensors=_pad(500_000)), None, settings)
    hf_hub.chunk_bytes, hf_hub.chunk_delay_s = 16 << 10, 0.2  # about 25 s for the whole file
    cache = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings)
    errors: list[LoraplaneError] = []

    def run() -> None:
        try:
            cache.prefetch(r)
        except LoraplaneError as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 30
    while hf_hub.active == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    cache.close()
    t.join(10)
    assert not t.is_alive() and time.monotonic() - started < 5
    assert [e.reason for e in errors] == [CACHE_CLOSED] and cache.index.entries() == []
    assert list((tmp_path / "cache" / "tmp").iterdir()) == []
    with pytest.raises(LoraplaneError) as e:
        cache.prefetch(r)
    assert e.value.reason == CACHE_CLOSED


def test_small_hub_files_are_checked_against_their_git_blob_id(tmp_path: Path, hf_hub: Any) -> None:
    settings = _hub_settings(hf_hub)
    r = s.resolve(_hub_repo(hf_hub, tmp_path, "a"), None, settings)
    assert r.file("adapter_config.json").sha256 is None  # not in LFS: only the blob id vouches for it
    stored = hf_hub.commits["team/a"][r.resolved_revision]["adapter_config.json"].path
    stored.write_text(stored.read_text().replace('"r": 8', '"r": 9'))
    cache = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), retries=0, sources_settings=settings)
    with pytest.raises(LoraplaneError) as e:
        cache.prefetch(r)
    assert e.value.reason == s.CHECKSUM_MISMATCH and "git blob id" in e.value.message
