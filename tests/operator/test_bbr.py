"""The body-based-routing ConfigMaps follow the LoRAAdapters: adds, renames, deletes, conflicts, splits.

A real operator process runs against the API server fixture with ``--bbr-namespace``; the ConfigMaps
are read back through the official client and parsed the way BBR parses them (``data.baseModel``, and
``data.adapters`` as a YAML list of names; several ConfigMaps may name one base model).
"""

from __future__ import annotations

import re
import time
from typing import Any

import yaml

from loraplane.operator import bbr

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
        (BASE, "shared", ("2026-01-01", "a", "x"), "a/x"),
        (OTHER, "shared", ("2026-01-02", "b", "y"), "b/y"),
        (OTHER, BASE, ("2026-01-03", "b", "z"), "b/z"),
        (OTHER, "solo", ("2026-01-04", "b", "w"), "b/w"),
    ]
    routed, left_out = bbr.desired_map(holders, {BASE, OTHER})
    assert routed == {BASE: {"shared"}, OTHER: {"solo"}}
    assert set(left_out) == {"b/y", "b/z"}
    assert "also served for base model" in left_out["b/y"] and "a/x" in left_out["b/y"]
    assert "also a base model's name" in left_out["b/z"]


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
