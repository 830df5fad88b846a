"""The body-based-routing ConfigMaps follow the LoRAAdapters: adds, renames, deletes, conflicts, splits.

A real operator process runs against the API server fixture with ``--bbr-namespace``; the ConfigMaps
are read back through the official client and parsed the way BBR parses them (``data.baseModel``, and
``data.adapters`` as a YAML list of names; several ConfigMaps may name one base model).
"""

from __future__ import annotations

import random
import re
import time
from typing import Any

import yaml

from loraplane.operator import bbr
from loraplane.operator.names import Claim

BASE = "meta-llama/Llama-2-7b-hf"
OTHER = "Qwen/Qwen2-0.5B"
SELECTOR = "inference.networking.k8s.io/bbr-managed=true"


def bbr_map(core: Any, ns: str) -> tuple[dict[str, str], dict[str, int]]:
    """What BBR would build from the namespace: served name -> base model, base model -> ConfigMaps."""
    routes: dict[str, str] = {}
    bases: dict[str, int] = {}
    for cm in core.list_namespaced_config_map(ns, label_selector=SELECTOR).items:
        base = cm.data["baseModel"].strip()
        bases[base] = bases.get(base, 0) + 1
        for name in yaml.safe_load(cm.data.get("adapters") or "[]") or []:
            assert name not in routes, f"{name} listed twice"
            routes[name] = base
    return routes, bases


def writes_logged(log: str) -> int:
    return sum(int(n) for n in re.findall(r"body-based routing: (\d+) ConfigMap writes", log))


def test_shards_split_by_a_stable_hash_and_fit() -> None:
    names = {f"tenant-{i:05d}-adapter" for i in range(2000)}
    one = bbr.shards(BASE, names, max_bytes=1_000_000)
    assert len(one) == 1 and one[0].names == names and one[0].name == bbr.configmap_name(BASE, 0, 1)
    split = bbr.shards(BASE, names, max_bytes=20_000)
    assert len(split) == 4, "2000 names of ~25 bytes: 50 KB over 4 ConfigMaps of <= 20 KB"
    assert set().union(*(s.names for s in split)) == names
    assert all(len(s.data()["adapters"].encode()) <= 20_000 for s in split)
    more = bbr.shards(BASE, names | {"one-more"}, max_bytes=20_000)
    changed = [a.index for a, b in zip(split, more, strict=True) if a.names != b.names]
    assert len(changed) == 1, "an added name rewrites one ConfigMap"
    assert all(len(s.name) <= 253 and re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", s.name) for s in split)
    odd = bbr.shards(BASE, {"true", "1e3", "- x", 'q"uote', "ünï"}, max_bytes=1000)[0]
    assert set(yaml.safe_load(odd.data()["adapters"])) == {"true", "1e3", "- x", 'q"uote', "ünï"}


def test_conflicting_names_go_to_the_oldest_and_base_model_names_are_kept_off() -> None:
    holders = [
        ((BASE, "shared"), Claim("2026-01-01", "a", "x")),
        ((OTHER, "shared"), Claim("2026-01-02", "b", "y")),
        ((OTHER, BASE), Claim("2026-01-03", "b", "z")),
        ((OTHER, "solo"), Claim("2026-01-04", "b", "w")),
    ]
    routes = bbr.Routes.build(holders, set(), 1_000_000)
    assert routed(routes) == {BASE: {"shared"}, OTHER: {"solo"}}
    assert set(routes.left_out) == {"b/y", "b/z"}
    assert "also served for base model" in routes.left_out["b/y"] and "a/x" in routes.left_out["b/y"]
    assert "also a base model's name" in routes.left_out["b/z"]
    # The older claimant goes: the next one takes the name, and is no longer left out; BASE, served by
    # no adapter and no worker now, is no base model any more, so the name equal to it is routed too.
    routes.set_holder((BASE, "shared"), None)
    assert routed(routes) == {OTHER: {"solo", "shared", BASE}} and set(routes.left_out) == set()
    routes.set_worker_bases({BASE})  # a worker serves it again: its (empty) ConfigMap, the name kept off
    assert routed(routes) == {BASE: set(), OTHER: {"solo", "shared"}} and set(routes.left_out) == {"b/z"}


def routed(routes: bbr.Routes) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for shard in routes.by_cm.values():
        out.setdefault(shard.base_model, set()).update(shard.names)
    return out


def test_routes_kept_change_by_change_equal_routes_built_from_scratch() -> None:
    """Random claims and releases (conflicts, names equal to a base model, base models that come and go
    with their workers, splits over 1..8 ConfigMaps and back): after every change the map kept change by
    change says exactly what one built from scratch says, and every ConfigMap that changed is marked."""
    rng = random.Random(21)
    bases = [BASE, OTHER, "third/model"]
    served = [f"tenant-{i:02d}" for i in range(40)] + bases
    holders: dict[tuple[str, str], Claim] = {}
    workers: set[str] = set()
    routes = bbr.Routes(120)
    before: dict[str, dict[str, str]] = {}
    counts = set()
    for step in range(1500):
        if step % 97 == 0:
            workers = set(rng.sample(bases, rng.randrange(3)))
            routes.set_worker_bases(workers)
        key = (rng.choice(bases), rng.choice(served))
        if rng.random() < 0.55 + 0.3 * (step // 500 % 2):  # fill, drain, fill: counts go up and down
            holders[key] = Claim(f"2026-01-01T{rng.randrange(60):02d}", "ns", f"a{step}")
        else:
            holders.pop(key, None)
        routes.set_holder(key, holders.get(key))
        fresh = bbr.Routes.build(holders.items(), workers, 120)
        now = {name: s.data() for name, s in routes.by_cm.items()}
        assert now == {name: s.data() for name, s in fresh.by_cm.items()}, step
        assert routes.left_out == fresh.left_out, step
        changed = {n for n in now.keys() | before.keys() if now.get(n) != before.get(n)}
        assert changed <= routes.dirty, (step, changed - routes.dirty)
        routes.dirty.clear()
        before = now
        counts |= {len(p) for p in routes.shards.values()}
    assert {1, 2, 4} <= counts, counts


def test_configmaps_follow_adds_renames_deletes(kube, adapters, operators, scope, wait) -> None:
    ns = kube.create_namespace()
    core = adapters.core
    try:
        op = operators(
            *scope(ns),
            "--bbr-namespace", ns, "--bbr-window", "0.2", "--bbr-resync", "1", "--bbr-max-bytes", "1000",
        )  # fmt: skip
        adapters.create(ns, "sql", {"baseModel": BASE, "path": "/models/sql"})
        adapters.create(ns, "chat", {"baseModel": BASE, "path": "/models/chat", "name": "chat-v1"})
        adapters.create(ns, "qsum", {"baseModel": OTHER, "path": "/models/qsum"})
        want = {"sql": BASE, "chat-v1": BASE, "qsum": OTHER}
        wait(lambda: bbr_map(core, ns)[0] == want, 20, lambda: f"{bbr_map(core, ns)} != {want}")
        assert bbr_map(core, ns)[1] == {BASE: 1, OTHER: 1}
        cm = core.read_namespaced_config_map(bbr.configmap_name(BASE, 0, 1), ns)
        assert cm.metadata.labels["inference.networking.k8s.io/bbr-managed"] == "true"
        assert cm.metadata.annotations["loraplane.io/base-model"] == BASE

        # Rename (a new served name), delete, and a name that moves to another base model (baseModel
        # is immutable: the adapter is replaced by one of the other base model).
        adapters.patch_spec(ns, "chat", {"name": "chat-v2"})
        adapters.delete(ns, "sql")
        adapters.delete(ns, "qsum")
        adapters.create(ns, "qsum2", {"baseModel": BASE, "path": "/models/qsum", "name": "qsum"})
        want = {"chat-v2": BASE, "qsum": BASE}
        wait(lambda: bbr_map(core, ns) == (want, {BASE: 1}), 20, lambda: f"{bbr_map(core, ns)} != {want}")

        # A name also served for another base model stays with the older adapter; the newer one is
        # left out, with a Warning Event that says why.
        time.sleep(1.1)  # creationTimestamp has one-second resolution
        adapters.create(ns, "late", {"baseModel": OTHER, "path": "/models/late", "name": "chat-v2"})
        event = wait(
            lambda: [
                e
                for e in core.list_namespaced_event(ns).items
                if e.involved_object.name == "late" and e.reason == "RoutingNameConflict"
            ],
            20,
            "a RoutingNameConflict Event",
        )[0]
        assert event.type == "Warning" and f"{ns}/chat" in event.message and "spec.name" in event.message
        assert bbr_map(core, ns)[0] == want and bbr_map(core, ns)[1] == {BASE: 1, OTHER: 1}

        # A ConfigMap deleted by hand comes back.
        core.delete_namespaced_config_map(bbr.configmap_name(BASE, 0, 1), ns)
        wait(lambda: bbr_map(core, ns)[0] == want, 20, "the deleted ConfigMap repaired")

        # A burst of 60 adapters costs a few writes, and splits the base model's names over several
        # ConfigMaps (--bbr-max-bytes 1000) without a name lost or listed twice.
        before = writes_logged(op.log())
        for i in range(60):
            adapters.create(ns, f"burst-adapter-number-{i:02d}", {"baseModel": BASE, "path": f"/models/b{i}"})
        want |= {f"burst-adapter-number-{i:02d}": BASE for i in range(60)}
        wait(lambda: bbr_map(core, ns)[0] == want, 60, lambda: f"{len(bbr_map(core, ns)[0])} of {len(want)}")
        assert bbr_map(core, ns)[1][BASE] >= 2
        burst = writes_logged(op.log()) - before
        assert 0 < burst <= 20, f"{burst} ConfigMap writes for 60 adapters"

        # Deleting every adapter of a base model that no worker serves removes its ConfigMaps.
        for name in ["chat", "qsum2", "late"] + [f"burst-adapter-number-{i:02d}" for i in range(60)]:
            adapters.delete(ns, name)
        wait(lambda: bbr_map(core, ns) == ({}, {}), 30, lambda: str(bbr_map(core, ns)))
    finally:
        kube.delete_namespace(ns)


def test_off_by_default(kube, adapters, operators, scope) -> None:
    ns = kube.create_namespace()
    try:
        operators(*scope(ns))
        adapters.create(ns, "sql", {"baseModel": BASE, "path": "/models/sql"})
        adapters.wait_status(ns, "sql", lambda s: s.get("id"), "an ID")
        time.sleep(1.5)  # longer than the default window
        assert adapters.core.list_namespaced_config_map(ns, label_selector=SELECTOR).items == []
    finally:
        kube.delete_namespace(ns)
