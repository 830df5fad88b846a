"""The controller's version rules, in-process with the real cache, validator and registry (no API server).

Desired states are fed to Controller.reconcile as the watch would publish them; the registry is what
the engine and the HTTP API read.
"""

from __future__ import annotations

import asyncio

import pytest
from support import adapters as adapters_mod
from support import servers
from support.procs import scaled

from loraplane.worker.cache import CacheIndex
from loraplane.worker.controller import Controller
from loraplane.worker.inference.basemodel import ModelConfig
from loraplane.worker.inference.engines import EngineSlot
from loraplane.worker.prefetch import Prefetcher
from loraplane.worker.registry import Registry
from loraplane.worker.sources import SourceSettings
from loraplane.worker.watch import DesiredVersion


@pytest.fixture
def world(tmp_path):
    base = ModelConfig.from_dir(adapters_mod.write_base_config(tmp_path / "base"), name="tiny")
    root = tmp_path / "adapters"
    root.mkdir()
    return base, root, tmp_path / "cache"


def _controller(base, root, cache_dir, **kw):
    settings = SourceSettings(local_roots=(root,), hf_endpoint=servers.closed_url(), timeout_s=2)
    prefetcher = Prefetcher(CacheIndex(cache_dir, 64 << 20), 2, retries=0, sources_settings=settings)
    cache = prefetcher.index
    registry = Registry()
    return (
        Controller(registry, prefetcher, base, settings, served_model="tiny", max_lora_rank=64, **kw),
        registry,
        cache,
    )


def _want(adapter_id, path, *, name="sql", key="ns/sql", stale=False):
    return DesiredVersion(adapter_id, key, name, str(path), None, None, "u", stale=stale)


async def _until(fn, timeout=10.0):
    deadline = asyncio.get_running_loop().time() + scaled(timeout)
    while not fn():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.02)


def test_versions_names_and_failures(world):
    base, root, cache_dir = world
    v1 = adapters_mod.write_adapter(root / "v1", seed=1)
    v2 = adapters_mod.write_adapter(root / "v2", seed=2)
    bad = adapters_mod.write_adapter(root / "bad", r=128)

    async def scenario():
        c, registry, cache = _controller(base, root, cache_dir)
        c.reconcile({2: _want(2, v1)})
        await _until(lambda: c.states() == {2: "Ready"})
        assert registry.lookup("sql").id == 2 and registry.lookup("sql").local_dir is not None
        assert cache.is_pinned(cache.entries()[0].cache_key)

        # The spec moved on but the new ID is not there yet (stale): nothing changes.
        c.reconcile({2: _want(2, v2, stale=True)})
        await asyncio.sleep(0.1)
        assert c.states() == {2: "Ready"}
        # Its new ID is known only as stale after a relist: the old version keeps serving.
        c.reconcile({22: _want(22, v2, stale=True)})
        await asyncio.sleep(0.1)
        assert c.states() == {2: "Ready"} and registry.lookup("sql").id == 2

        # A bad new version fails; the old one keeps serving.
        c.reconcile({22: _want(22, bad)})
        await _until(lambda: c.states() == {2: "Ready", 22: "Failed"})
        assert registry.lookup("sql").id == 2
        assert [r.reason for r in c.reports()] == [None, "RankTooLarge"]
        assert len(cache.entries()) == 1  # the refused version's files left the cache; the served one stays

        # A good one replaces it; the old one is dropped once it is Ready.
        c.reconcile({23: _want(23, v2)})
        await _until(lambda: c.states() == {23: "Ready"})
        assert registry.lookup("sql").id == 23 and registry.by_id(2) is None

        # A served-name change keeps the ID and moves the name.
        c.reconcile({23: _want(23, v2, name="sql-v2")})
        await _until(lambda: c.states() == {23: "Ready"} and registry.lookup("sql-v2") is not None)
        assert registry.lookup("sql") is None

        # Deleted: gone from the registry, unpinned in the cache.
        c.reconcile({})
        assert registry.snapshot() == [] and not any(cache.is_pinned(e.cache_key) for e in cache.entries())

    asyncio.run(scenario())


def test_retryable_errors_retry_and_a_bad_adapter_blocks_nothing(world):
    base, root, cache_dir = world
    good = adapters_mod.write_adapter(root / "good")

    async def scenario():
        c, registry, _ = _controller(base, root, cache_dir, max_concurrent=1)
        c.reconcile({
            1: _want(1, "hf://org/unreachable", name="a", key="ns/a"),
            2: _want(2, root / "missing", name="b", key="ns/b"),
            3: _want(3, good, name="c", key="ns/c"),
        })  # fmt: skip
        await _until(lambda: c.states().get(3) == "Ready" and c.states().get(2) == "Failed")
        await _until(lambda: any(r.id == 1 and r.reason == "SourceUnreachable" for r in c.reports()))
        reports = {r.id: r for r in c.reports()}
        assert reports[1].state == "Prefetching" and "retrying" in reports[1].message
        assert reports[2].reason == "SourceNotFound"
        assert [v.served_name for v in registry.ready()] == ["c"]
        c.reconcile({})

    asyncio.run(scenario())


def test_a_pool_that_requires_signatures_loads_only_verified_adapters(world, tmp_path):
    """--require-signatures: an unsigned adapter and a mispinned one fail with their reasons before any
    load; the refused files leave the cache unless a verified version holds the same files."""
    from support import signing

    from loraplane.worker import provenance

    base, root, cache_dir = world
    key, public = signing.key_pair(tmp_path / "keys", "team")
    signed = adapters_mod.write_adapter(root / "signed", seed=1)
    signing.sign_with_key(signed, key)
    unsigned = adapters_mod.write_adapter(root / "unsigned", seed=2)
    digest = provenance.digest_of(provenance.file_digests(signed))
    loaded: list[int] = []

    async def scenario():
        trust = provenance.Trust(public_keys=(public,))

        class Recording:  # the engine side: what the controller hands over before Ready
            async def add_adapter(self, adapter):
                loaded.append(adapter.id)

        engine = EngineSlot(Recording())  # type: ignore[arg-type]
        c, _, cache = _controller(base, root, cache_dir, trust=trust, require_signatures=True, engine=engine)
        c.reconcile({
            1: DesiredVersion(1, "ns/a", "a", str(signed), None, None, "u", digest=digest),
            2: _want(2, unsigned, name="b", key="ns/b"),
            3: DesiredVersion(3, "ns/c", "c", str(signed), None, None, "u", digest="sha256:" + "0" * 64),
        })  # fmt: skip
        await _until(lambda: c.states() == {1: "Ready", 2: "Failed", 3: "Failed"})
        reports = {r.id: r for r in c.reports()}
        assert {i: r.reason for i, r in reports.items()} == {
            1: None,
            2: "SignatureMissing",
            3: "DigestMismatch",
        }
        assert loaded == [1]
        assert (reports[1].info.digest, reports[1].info.signer) == (digest, "key team.pub")
        # The unsigned files left the cache; the signed ones stay (version 1 serves them; 3 shared them).
        assert [e.digest for e in cache.entries()] == [digest]
        c.reconcile({})

    asyncio.run(scenario())
