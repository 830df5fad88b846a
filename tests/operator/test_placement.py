"""Placement with real processes: the operator and control-mode workers against the API server fixture.

Adapters with spec.replicas go to that many live workers (status.placement), which alone prefetch and
validate them; a killed worker's adapters move to others within the heartbeat window, and when it returns
it takes back the adapters that rank it in their top k (no reshuffle); a worker added takes only the adapters that rank it
first; a full worker (--max-adapters) is skipped with a reason; adapters without replicas stay on
every worker, unless the pool sets --default-replicas.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from support import adapters as adapters_mod
from support import fleet

from loraplane.operator import placement

BASE = "meta-llama/Llama-2-7b-hf"
# The operator's; workers beat every 2 s (support.procs.WorkerProc). Generous, so that a worker
# stalled by a loaded machine does not look dead and move adapters the test did not move.
HEARTBEAT_WINDOW = 8.0


def _placed(ads: fleet.Adapters, names: list[str]) -> dict[str, tuple[str, ...]]:
    out = {}
    for n in names:
        p = (ads.get(n).get("status") or {}).get("placement") or {}
        out[n] = tuple(sorted(p.get("workers") or ()))
    return out


def _worker_status(kube: Any, namespace: str, name: str) -> dict[str, Any]:
    from kubernetes import client

    with kube.api_client() as api:
        obj = client.CustomObjectsApi(api).get_namespaced_custom_object(
            fleet.GROUP, fleet.VERSION, namespace, "loraworkers", name
        )
    return obj.get("status") or {}


def _all_ready(ads: fleet.Adapters, names: list[str], want: str) -> bool:
    return all((ads.get(n).get("status") or {}).get("ready") == want for n in names)


def _events(kube: Any, namespace: str, reason: str) -> list[Any]:
    from kubernetes import client

    with kube.api_client() as api:
        return [e for e in client.CoreV1Api(api).list_namespaced_event(namespace).items if e.reason == reason]


def _setup(tmp_path: Path, n: int) -> tuple[Path, Path, list[str]]:
    base = adapters_mod.write_base_config(tmp_path / "base")
    root = tmp_path / "adapters"
    names = [f"a{i:02d}" for i in range(n)]
    for i, name in enumerate(names):
        adapters_mod.write_adapter(root / name, seed=i % 4)
    return base, root, names


def _worker(kube: Any, tmp_path: Path, namespace: str, name: str, base: Path, root: Path, *extra: str):
    return fleet.WorkerProc(
        kube.kubeconfig, tmp_path, name=name, namespace=namespace, base_dir=base, local_root=root,
        extra=list(extra),
    )  # fmt: skip


def test_spread_kill_return_and_add(kube, crds, namespace, tmp_path) -> None:
    base, root, names = _setup(tmp_path, 12)
    ads = fleet.Adapters(kube, namespace)
    op = fleet.OperatorProc(
        kube.kubeconfig, namespace, tmp_path / "operator.log", heartbeat_window=HEARTBEAT_WINDOW
    )
    workers = {f"w{i}": _worker(kube, tmp_path, namespace, f"w{i}", base, root) for i in range(4)}
    late = _worker(kube, tmp_path, namespace, "w4", base, root)
    refs = {w: f"{namespace}/{w}" for w in [*workers, "w4"]}
    procs = [*workers.values(), late]
    logs = lambda: op.log()[-3000:] + "".join(p.log()[-800:] for p in procs)  # noqa: E731
    try:
        op.start()
        for w in workers.values():
            w.start()
        fleet.wait_for(
            lambda: (
                all(_worker_status(kube, namespace, w).get("heartbeatTime") for w in workers)
                if _has_workers(kube, namespace, len(workers))
                else False
            ),
            60,
            logs,
        )
        for name in names:
            ads.create(_with_replicas(fleet.adapter_obj(name, str(root / name)), 2))
        fleet.wait_for(lambda: _all_ready(ads, names, "2/2"), 90, logs)
        before = _placed(ads, names)
        assert all(len(set(p)) == 2 for p in before.values()), before
        # Each worker holds only what is placed on it: 24 placements, not 12 x 4.
        per_worker = {w: sum(refs[w] in p for p in before.values()) for w in workers}
        assert sum(per_worker.values()) == 24 and max(per_worker.values()) <= 9, per_worker
        for w, count in per_worker.items():
            st = fleet.wait_for(
                lambda w=w, count=count: (
                    s if (s := _worker_status(kube, namespace, w)).get("ready") == count else None
                ),
                30,
                lambda w=w: f"{w}: ready {_worker_status(kube, namespace, w)}, placed {per_worker}",
            )
            assert st["assigned"] == count

        # Kill w3 (SIGKILL: its LoRAWorker stays, its heartbeat stops): its adapters move, no other does.
        on_w3 = {n for n, p in before.items() if refs["w3"] in p}
        assert on_w3, before
        workers["w3"].kill()
        fleet.wait_for(
            lambda: all(refs["w3"] not in p for p in _placed(ads, names).values()),
            HEARTBEAT_WINDOW + 10,
            logs,
        )
        fleet.wait_for(lambda: _all_ready(ads, names, "2/2"), 60, logs)
        after_kill = _placed(ads, names)
        moved = {n for n in names if after_kill[n] != before[n]}
        assert moved == on_w3, (moved, on_w3)
        assert all(len(set(after_kill[n]) & set(before[n])) == 1 for n in on_w3), after_kill
        assert _events(kube, namespace, "Moved"), "a Moved Event for the adapters that moved"

        # w3 comes back: it takes the adapters that rank it above one of their workers (rendezvous: the
        # ranking decides, not history), up to the bounded load, and nothing else moves.
        uids = {n: ads.get(n)["metadata"]["uid"] for n in names}
        expected = {n for n in names if placement.moves_to(uids[n], list(after_kill[n]), 2, refs["w3"])}
        bound = math.ceil(placement.BOUND_FACTOR * 24 / len(workers))
        workers["w3"] = _worker(kube, tmp_path, namespace, "w3", base, root).start()
        procs.append(workers["w3"])
        fleet.wait_for(
            lambda: sum(refs["w3"] in _placed(ads, names)[n] for n in expected) >= min(len(expected), bound),
            60,
            lambda: f"expected on w3: {sorted(expected)}\n{_placed(ads, names)}\n{logs()}",
        )
        fleet.wait_for(lambda: _all_ready(ads, names, "2/2"), 60, logs)
        back = _placed(ads, names)
        moved = {n for n in names if back[n] != after_kill[n]}
        assert moved <= expected, (expected, after_kill, back)
        for n in moved:
            assert refs["w3"] in back[n] and len(set(back[n]) & set(after_kill[n])) == 1, (
                after_kill[n],
                back[n],
            )
        assert on_w3 & moved, (on_w3, moved)  # some of its old adapters come back to it
        before = back

        # A fifth worker takes only the adapters that rank it in their top two.
        late.start()
        fleet.wait_for(lambda: any(refs["w4"] in p for p in _placed(ads, names).values()), 30, lambda: logs())
        fleet.wait_for(lambda: _all_ready(ads, names, "2/2"), 60, logs)
        after_add = _placed(ads, names)
        moved = {n for n in names if after_add[n] != before[n]}
        assert moved == {n for n in names if refs["w4"] in after_add[n]}, (before, after_add)
        assert len(moved) <= 8, after_add  # about 24 / 5; never a reshuffle
        for n in moved:
            assert len(set(after_add[n]) & set(before[n])) == 1, (before[n], after_add[n])
    finally:
        for p in procs:
            if p.alive():
                p.stop()
        op.stop()
        ads.close()


def _has_workers(kube: Any, namespace: str, n: int) -> bool:
    from kubernetes import client

    with kube.api_client() as api:
        items = client.CustomObjectsApi(api).list_namespaced_custom_object(
            fleet.GROUP, fleet.VERSION, namespace, "loraworkers"
        )["items"]
    return len(items) >= n


def _with_replicas(obj: dict[str, Any], replicas: int | None) -> dict[str, Any]:
    if replicas is not None:
        obj["spec"]["replicas"] = replicas
    return obj


@contextlib.contextmanager
def _pool(
    kube: Any, namespace: str, tmp_path: Path, adapters: int, *worker_args: str
) -> Iterator[tuple[fleet.Adapters, Path, list[str], Callable[[], str]]]:
    """The operator and two workers (``worker_args``) running, ``adapters`` adapter directories written:
    yields the adapters' client, their root, their names and the logs' tails."""
    base, root, names = _setup(tmp_path, adapters)
    ads = fleet.Adapters(kube, namespace)
    op = fleet.OperatorProc(
        kube.kubeconfig, namespace, tmp_path / "operator.log", heartbeat_window=HEARTBEAT_WINDOW
    )
    workers = [_worker(kube, tmp_path, namespace, f"w{i}", base, root, *worker_args) for i in range(2)]
    logs = lambda: op.log()[-3000:] + "".join(p.log()[-800:] for p in workers)  # noqa: E731
    try:
        op.start()
        for w in workers:
            w.start()
        fleet.wait_for(lambda: _has_workers(kube, namespace, 2), 60, logs)
        yield ads, root, names, logs
    finally:
        for w in workers:
            if w.alive():
                w.stop()
        op.stop()
        ads.close()


def test_full_workers_are_skipped_and_unset_replicas_mean_every_worker(
    kube, crds, namespace, tmp_path
) -> None:
    with _pool(kube, namespace, tmp_path, 4, "--max-adapters", "2") as (ads, root, names, logs):
        # Unset replicas: every worker, as before placement existed; no status.placement at all.
        ads.create(fleet.adapter_obj("every", str(root / names[0])))
        fleet.wait_for(lambda: _all_ready(ads, ["every"], "2/2"), 60, logs)
        assert "placement" not in ads.get("every")["status"]
        # Two slots per worker: two adapters on both fill them; a third is placed nowhere, with the reason.
        for name in names[1:3]:
            ads.create(_with_replicas(fleet.adapter_obj(name, str(root / name)), 2))
        fleet.wait_for(lambda: _all_ready(ads, names[1:3], "2/2"), 60, logs)
        ads.create(_with_replicas(fleet.adapter_obj(names[3], str(root / names[3])), 1))

        def refused() -> dict[str, Any] | None:
            s = ads.get(names[3]).get("status") or {}
            return s if (s.get("placement") or {}).get("reason") == "InsufficientCapacity" else None

        st = fleet.wait_for(refused, 30, logs)
        assert st["placement"]["workers"] == [] and st["ready"] == "0/1", st
        assert "--max-adapters" in st["placement"]["message"] and f"{namespace}/w0" in st["message"], st
        ready = {c["type"]: c for c in st["conditions"]}["Ready"]
        assert ready["reason"] == "InsufficientCapacity", ready
        warn = fleet.wait_for(lambda: _events(kube, namespace, "InsufficientCapacity"), 10, "a Warning Event")
        assert warn[0].type == "Warning"
        for w in ("w0", "w1"):  # the full workers never loaded it
            assert _worker_status(kube, namespace, w).get("assigned") == 3  # "every" + two placed
        # Room again: the short adapter is placed as soon as another one goes.
        ads.delete(names[1])
        fleet.wait_for(lambda: _all_ready(ads, [names[3]], "1/1"), 30, logs)


def test_pool_default_replicas(kube, crds, namespace, tmp_path) -> None:
    with _pool(kube, namespace, tmp_path, 3, "--default-replicas", "1") as (ads, root, names, logs):
        ads.create(fleet.adapter_obj(names[0], str(root / names[0])))  # the pool's default: 1
        ads.create(_with_replicas(fleet.adapter_obj(names[1], str(root / names[1])), 0))  # 0: every worker
        fleet.wait_for(lambda: _all_ready(ads, [names[0]], "1/1"), 60, logs)
        fleet.wait_for(lambda: _all_ready(ads, [names[1]], "2/2"), 60, logs)
        assert len(ads.get(names[0])["status"]["placement"]["workers"]) == 1
        assert "placement" not in ads.get(names[1])["status"]


def _future(offset: float) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_replicas_follow_demand_with_hysteresis(adapters, operators, namespace, scope, wait, kube) -> None:
    """Workers written by hand (a heartbeat an hour ahead keeps them live) report requests waiting for
    one adapter; the operator adds replicas only after the demand held for --demand-up-seconds, never
    above the pool's maxReplicas, and gives them back one by one after --demand-down-seconds of quiet."""
    up, down = 2.0, 6.0
    operators(
        *scope(namespace),
        "--demand-waiting", "4", "--demand-up-seconds", str(up), "--demand-down-seconds", str(down),
    )  # fmt: skip
    spec = {
        "baseModel": BASE,
        "capacity": {"maxLoras": 4, "maxLoraRank": 16, "maxCpuLoras": 8, "cacheBytes": 0},
        "placement": {"maxReplicas": 3},
    }
    for w in ("w0", "w1", "w2", "w3"):
        adapters.create_worker(namespace, w, spec, {"heartbeatTime": _future(3600)})
    adapters.create(namespace, "hot", {"baseModel": BASE, "path": "/models/hot", "replicas": 1})
    st = adapters.wait_status(
        namespace, "hot", lambda s: len((s.get("placement") or {}).get("workers") or []) == 1, "placed on 1"
    )
    adapter_id, first = st["id"], st["placement"]["workers"][0].split("/")[1]

    def waiting(n: int | None) -> None:
        adapters.co.patch_namespaced_custom_object_status(
            "loraplane.io", "v1alpha1", namespace, "loraworkers", first,
            {"status": {"waiting": {str(adapter_id): n} if n else None}},
        )  # fmt: skip

    def replicas() -> int:
        return (adapters.status(namespace, "hot").get("placement") or {}).get("replicas", 0)

    # A burst shorter than the up window changes nothing.
    waiting(20)
    time.sleep(up / 2)
    waiting(None)
    time.sleep(up * 1.5)
    assert replicas() == 1
    # Sustained demand: one replica per up window, up to the pool's maxReplicas (3), never above.
    waiting(20)
    t0 = time.monotonic()
    wait(lambda: replicas() == 2, 15, "a second replica")
    assert time.monotonic() - t0 >= up * 0.9
    wait(lambda: replicas() == 3, 15, "a third replica")
    time.sleep(up * 2)
    st = adapters.status(namespace, "hot")
    assert st["placement"]["replicas"] == 3 and len(set(st["placement"]["workers"])) == 3, st
    assert st["placement"]["reason"] == "ScaledUp" and "requests kept waiting" in st["placement"]["message"]
    # Quiet: the added replicas go back one per down window, not at once.
    waiting(None)
    t0 = time.monotonic()
    time.sleep(down / 2)
    assert replicas() == 3
    wait(lambda: replicas() == 2, down + 10, "one replica given back")
    assert time.monotonic() - t0 >= down * 0.9
    wait(lambda: replicas() == 1, down + 10, "back to spec.replicas")
    st = adapters.status(namespace, "hot")
    assert st["placement"]["reason"] == "ScaledDown" and len(st["placement"]["workers"]) == 1, st
    scaled = [
        e.reason
        for e in adapters.core.list_namespaced_event(namespace).items
        if e.involved_object.name == "hot"
    ]
    assert "ScaledUp" in scaled and "ScaledDown" in scaled, scaled


def _reconciles(port: int, trigger: str) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f'loraplane_operator_adapter_reconciles_total{{trigger="{trigger}"}}'):
                return float(line.split()[-1])
    return 0.0


def test_room_freed_by_a_delete_goes_to_one_short_adapter(
    adapters, operators, namespace, scope, wait, kube
) -> None:
    """Two full workers (hand-written, --max-adapters 2 each) and three adapters short of their one
    replica: deleting a placed adapter frees one place, and one short adapter takes it. The operator
    recomputes only that one, not every short adapter (nor, as before, every adapter of the pool)."""
    port = fleet.free_port()
    operators(*scope(namespace), "--metrics-port", str(port))
    spec = {
        "baseModel": BASE,
        "capacity": {"maxLoras": 4, "maxLoraRank": 16, "maxCpuLoras": 8, "cacheBytes": 0, "maxAdapters": 2},
    }
    for w in ("w0", "w1"):
        adapters.create_worker(namespace, w, spec, {"heartbeatTime": _future(3600)})
    placed = [f"p{i}" for i in range(4)]
    short = [f"s{i}" for i in range(3)]
    for name in placed:
        adapters.create(namespace, name, {"baseModel": BASE, "path": f"/models/{name}", "replicas": 1})
        adapters.wait_status(
            namespace, name, lambda s: len((s.get("placement") or {}).get("workers") or []) == 1, "placed", 60
        )
    for name in short:
        adapters.create(namespace, name, {"baseModel": BASE, "path": f"/models/{name}", "replicas": 1})
        adapters.wait_status(
            namespace,
            name,
            lambda s: (s.get("placement") or {}).get("reason") == "InsufficientCapacity",
            "short",
        )
    before = _reconciles(port, "worker")
    adapters.delete(namespace, placed[0])

    def taken() -> list[str]:
        return [n for n in short if (adapters.status(namespace, n).get("placement") or {}).get("workers")]

    wait(lambda: len(taken()) == 1, 60, "one short adapter placed in the freed room")
    time.sleep(2.0)  # anything else the delete set off has happened by now
    assert len(taken()) == 1
    assert _reconciles(port, "worker") - before == 1
