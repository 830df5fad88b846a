"""The worker's list+watch survives the API server going away: it reconnects with backoff, resumes from
its last resourceVersion, relists on 410 Gone, on 404 and when the server's resourceVersion went back
(a server back with an empty store), and ends up serving exactly what the objects say, with nothing
lost and nothing prepared twice.

These tests run their own local API server (not the session fixture) because they stop and restart
it, keeping its store (as kube-apiserver keeps etcd) or not (etcd lost). While it is down, the first
test writes through the store directly, as if another API server replica had taken the writes.
"""

from __future__ import annotations

import re
import signal
import time

import pytest
from support import adapters as adapters_mod
from support import fleet
from support.apiserver import bump_resource_version, create_namespace

from loraplane.crds.models import version_of
from loraplane.worker.watch import DesiredVersion, desired_from


def _ready_lines(log: str) -> dict[int, int]:
    """How many times each adapter ID became Ready, from the worker's log."""
    counts: dict[int, int] = {}
    for m in re.finditer(r"adapter \S+ id (\d+) Ready", log):
        counts[int(m.group(1))] = counts.get(int(m.group(1)), 0) + 1
    return counts


def test_api_server_restart_nothing_lost_or_served_twice(own_kube, tmp_path):
    kube, server = own_kube, own_kube.server
    ns = kube.create_namespace()
    base = adapters_mod.write_base_config(tmp_path / "base")
    root = tmp_path / "adapters"
    dirs = {
        n: adapters_mod.write_adapter(root / n, seed=i)
        for i, n in enumerate(["a1", "a2", "a2v2", "a3", "a4", "a5", "a6"])
    }
    ads = fleet.Adapters(kube, ns)
    w = fleet.WorkerProc(kube.kubeconfig, tmp_path, name="w1", namespace=ns, base_dir=base, local_root=root)
    with w:
        for i, n in enumerate(["a1", "a2", "a3"], start=1):
            ads.create(fleet.adapter_obj(n, str(dirs[n])))
            ads.assign(n, i)
        want = {1: "Ready", 2: "Ready", 3: "Ready"}
        fleet.wait_for(lambda: fleet.states(ads, "w1", ns) == want, 30, lambda: f"{want}\n{w.log()[-3000:]}")
        lists_before = w.metric("loraplane_worker_adapter_lists_total")

        # Down: the worker loses its watch. Meanwhile another replica takes writes: a1 deleted, a2 gets
        # a new version (new path, new ID), a4 registered; the history is compacted so that resuming
        # from the worker's resourceVersion is 410 Gone and the worker must relist.
        server.stop()
        time.sleep(1.0)
        cluster = server.state.cluster
        rt = cluster.type("loraplane.io", "v1alpha1", "loraadapters")
        cluster.delete(rt, ns, "a1", {})
        cond = {"type": "NameAvailable", "status": "True", "reason": "NameAvailable", "message": "",
                "lastTransitionTime": "2026-01-01T00:00:00Z"}  # fmt: skip
        a2 = cluster.get(rt, ns, "a2")
        a2 = {**a2, "spec": {**a2["spec"], "path": str(dirs["a2v2"])}}
        a2, _ = cluster.update(rt, ns, "a2", a2, check_rv=False)
        cluster.update(
            rt, ns, "a2", {**a2, "status": {"id": 22, "conditions": [cond]}}, "status", check_rv=False
        )
        a4, _ = cluster.create(rt, ns, fleet.adapter_obj("a4", str(dirs["a4"])))
        cluster.update(
            rt, ns, "a4", {**a4, "status": {"id": 4, "conditions": [cond]}}, "status", check_rv=False
        )
        cluster.store.set_history_limit(1)
        server.start()

        want = {22: "Ready", 3: "Ready", 4: "Ready"}
        fleet.wait_for(lambda: fleet.states(ads, "w1", ns) == want, 40, lambda: f"{want}\n{w.log()[-3000:]}")
        assert w.metric("loraplane_worker_adapter_lists_total") > lists_before, "410 Gone must relist"
        assert w.metric("loraplane_worker_watch_reconnects_total") >= 1

        # Down again with the history intact: the worker resumes its watch from its resourceVersion
        # (no relist) and sees what happens after the restart. First a change the worker sees with the
        # full history back, so its resourceVersion is newer than anything compacted.
        cluster.store.set_history_limit(10000)
        ads.create(fleet.adapter_obj("a5", str(dirs["a5"])))
        ads.assign("a5", 5)
        want = {22: "Ready", 3: "Ready", 4: "Ready", 5: "Ready"}
        fleet.wait_for(lambda: fleet.states(ads, "w1", ns) == want, 40, lambda: f"{want}\n{w.log()[-3000:]}")
        lists_before = w.metric("loraplane_worker_adapter_lists_total")
        server.stop()
        time.sleep(1.0)
        server.start()
        ads2 = fleet.Adapters(kube, ns)
        fleet.wait_for(
            lambda: _try(lambda: ads2.create(fleet.adapter_obj("a6", str(dirs["a6"])))), 20, "create a6"
        )
        ads2.assign("a6", 6)
        want = {22: "Ready", 3: "Ready", 4: "Ready", 5: "Ready", 6: "Ready"}
        fleet.wait_for(lambda: fleet.states(ads2, "w1", ns) == want, 40, lambda: f"{want}\n{w.log()[-3000:]}")
        assert w.metric("loraplane_worker_adapter_lists_total") == lists_before, "resumed, not relisted"

        # Nothing prepared twice, nothing downloaded twice: one Ready per ID, one cache miss per version.
        assert _ready_lines(w.log()) == {1: 1, 2: 1, 3: 1, 22: 1, 4: 1, 5: 1, 6: 1}
        assert w.metric("loraplane_worker_cache_misses_total") == 7
        assert w.stop() == 0
        ads2.close()
    ads.close()


def test_api_server_back_empty_relists_instead_of_resuming(own_kube, tmp_path):
    kube, server = own_kube, own_kube.server
    ns = kube.create_namespace()
    base = adapters_mod.write_base_config(tmp_path / "base")
    root = tmp_path / "adapters"
    dirs = {n: adapters_mod.write_adapter(root / n, seed=i) for i, n in enumerate(["a1", "a2", "a3"])}
    ads = fleet.Adapters(kube, ns)
    w = fleet.WorkerProc(kube.kubeconfig, tmp_path, name="w1", namespace=ns, base_dir=base, local_root=root)
    with w:
        ads.create(fleet.adapter_obj("a1", str(dirs["a1"])))
        ads.assign("a1", 1)
        fleet.wait_for(lambda: fleet.states(ads, "w1", ns) == {1: "Ready"}, 30, lambda: w.log()[-3000:])

        # Back empty, the CRDs a moment later: list and watch get 404; the worker keeps serving what it
        # has until it can list again, then serves exactly what the new store holds.
        server.restart(empty=True)
        time.sleep(2)
        kube.apply_crds()
        create_namespace(kube, ns)
        ads = fleet.Adapters(kube, ns)
        ads.create(fleet.adapter_obj("a2", str(dirs["a2"])))
        ads.assign("a2", 2)
        want = {2: "Ready"}
        fleet.wait_for(lambda: _states(ads, ns) == want, 40, lambda: w.log()[-3000:])

        # Back empty while the worker is paused, the CRDs in place before it reconnects: resuming from
        # its resourceVersion would wait for versions the new store never issues. It must relist.
        bump_resource_version(kube, ns, "a2")
        w.proc.send_signal(signal.SIGSTOP)
        try:
            server.restart(empty=True)
            kube.apply_crds()
            create_namespace(kube, ns)
            ads = fleet.Adapters(kube, ns)
            ads.create(fleet.adapter_obj("a3", str(dirs["a3"])))
            ads.assign("a3", 3)
        finally:
            w.proc.send_signal(signal.SIGCONT)
        want = {3: "Ready"}
        fleet.wait_for(lambda: _states(ads, ns) == want, 40, lambda: w.log()[-3000:])
        assert "resourceVersion went back below" in w.log()
        assert w.stop() == 0
    ads.close()


def _states(ads, ns):
    """The worker's reported states, or None while the server is not answering."""
    try:
        return fleet.states(ads, "w1", ns)
    except Exception:
        return None


def _try(fn):
    try:
        return fn() or True
    except Exception:
        return False


def _obj(
    name,
    *,
    base="tiny",
    adapter_id=7,
    name_available="True",
    spec=None,
    deleting=False,
    version=None,
    observed=None,
):
    obj = fleet.adapter_obj(name, "/models/x", base_model=base)
    obj["metadata"].update(namespace="ns", uid="u1")
    if deleting:
        obj["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    obj["spec"].update(spec or {})
    if adapter_id is not None:
        obj["status"] = {"id": adapter_id, "conditions": [
            {"type": "NameAvailable", "status": name_available, "reason": "X", "message": "",
             "lastTransitionTime": "2026-01-01T00:00:00Z"}]}  # fmt: skip
        if version:
            obj["status"]["version"] = version
        if observed is not None:
            obj["metadata"]["generation"] = 3
            obj["status"]["conditions"][0]["observedGeneration"] = observed
        if name_available is None:
            obj["status"]["conditions"] = []
    return obj


DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    "obj, expected",
    [
        (_obj("a"), DesiredVersion(7, "ns/a", "a", "/models/x", None, None, "u1")),
        (_obj("a", spec={"name": "sql", "revision": "v2", "longContext": {"maxLength": 4096}}),
         DesiredVersion(7, "ns/a", "sql", "/models/x", "v2", 4096, "u1")),
        (_obj("a", version=version_of("/models/x", None)),  # status.id is this spec's version
         DesiredVersion(7, "ns/a", "a", "/models/x", None, None, "u1")),
        (_obj("a", version="0123456789abcdef"),  # the spec moved on; status.id names the previous version
         DesiredVersion(7, "ns/a", "a", "/models/x", None, None, "u1", stale=True)),
        (_obj("a", observed=3), DesiredVersion(7, "ns/a", "a", "/models/x", None, None, "u1")),
        (_obj("a", spec={"digest": DIGEST, "signature": {}}, version=version_of("/models/x", None, DIGEST)),
         DesiredVersion(7, "ns/a", "a", "/models/x", None, None, "u1", digest=DIGEST, signature_required=True)),
        (_obj("a", spec={"digest": DIGEST}, version=version_of("/models/x", None)),  # pinned: a new version
         DesiredVersion(7, "ns/a", "a", "/models/x", None, None, "u1", stale=True, digest=DIGEST)),
        (_obj("a", observed=2),  # NameAvailable decided for an older spec (the name may have changed)
         DesiredVersion(7, "ns/a", "a", "/models/x", None, None, "u1", stale=True)),
        (_obj("a", name_available=None), None),  # the operator has not decided the name yet
        (_obj("a", base="other"), None),  # another base model
        (_obj("a", adapter_id=None), None),  # no ID yet
        (_obj("a", name_available="False"), None),  # its served name belongs to another adapter
        (_obj("a", deleting=True), None),  # being deleted
        (_obj("a", spec={"path": "relative/../x"}), None),  # invalid: the operator reports it
    ],
)  # fmt: skip
def test_desired_from_object(obj, expected):
    assert desired_from(obj, "tiny") == expected
