"""Served-name ownership across namespaces, and aggregation of LoRAWorker reports."""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

import pytest

from loraplane.crds.models import WorkerAdapterReport
from loraplane.worker import report

BASE = "meta-llama/Llama-2-7b-hf"
OTHER = "Qwen/Qwen2-0.5B"
CAPACITY = {"maxLoras": 4, "maxLoraRank": 16, "maxCpuLoras": 8, "cacheBytes": 0}


def test_served_name_clash_oldest_keeps_it_and_hands_over_on_delete(
    kube, adapters, operators, scope, wait
) -> None:
    ns = [kube.create_namespace() for _ in range(3)]
    try:
        operators(*scope(*ns))
        adapters.create(ns[0], "first", {"baseModel": BASE, "path": "/models/x", "name": "shared"})
        adapters.wait_status(ns[0], "first", lambda s: s.get("id"), "an ID")
        time.sleep(1.1)  # creationTimestamp has one-second resolution.
        adapters.create(ns[1], "second", {"baseModel": BASE, "path": "/models/y", "name": "shared"})
        time.sleep(1.1)
        adapters.create(ns[2], "third", {"baseModel": BASE, "path": "/models/z", "name": "shared"})
        # Same served name for another base model is no clash.
        adapters.create(ns[2], "other-base", {"baseModel": OTHER, "path": "/models/q", "name": "shared"})
        for n, name in ((ns[1], "second"), (ns[2], "third")):
            st = adapters.wait_status(n, name, lambda s: s.get("phase") == "Pending", "NameTaken")
            cond = {c["type"]: c for c in st["conditions"]}["NameAvailable"]
            assert cond["status"] == "False" and cond["reason"] == "NameTaken"
            assert f"held by {ns[0]}/first" in cond["message"] and f"held by {ns[0]}/first" in st["message"]
            assert st["id"] > 0  # It keeps its ID; it is just not served under the name.
        st = adapters.wait_status(ns[2], "other-base", lambda s: s.get("phase"), "a phase")
        assert st["phase"] == "Registered"

        adapters.delete(ns[0], "first")
        st = adapters.wait_status(
            ns[1], "second", lambda s: s.get("phase") == "Registered", "the name handed over"
        )
        assert {c["type"]: c for c in st["conditions"]}["NameAvailable"]["status"] == "True"
        st3 = adapters.wait_status(
            ns[2],
            "third",
            lambda s: f"held by {ns[1]}/second" in s.get("message", ""),
            "the new holder named",
        )
        assert st3["phase"] == "Pending"
        events = wait(
            lambda: [
                e
                for e in adapters.core.list_namespaced_event(ns[1]).items
                if e.involved_object.name == "second" and e.reason == "NameClaimed"
            ],
            10,
            "a NameClaimed event on the new holder",
        )
        assert "belongs to this adapter" in events[0].message
        taken = [e for e in adapters.core.list_namespaced_event(ns[2]).items if e.reason == "NameTaken"]
        assert taken and taken[0].type == "Warning"
    finally:
        for n in ns:
            kube.delete_namespace(n)


def _now(offset: float = 0) -> str:
    return (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=offset)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _report(ns: str, name: str, id_: int, state: str, **extra: Any) -> dict[str, Any]:
    return {"id": id_, "adapter": f"{ns}/{name}", "state": state, **extra}


def _status(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """A worker's status with these reports, encoded as a worker writes it."""
    status = report.status_of([WorkerAdapterReport.model_validate(r) for r in reports])
    status.pop("heartbeatTime")
    return status


def _pod(adapters: Any, ns: str, name: str) -> dict[str, Any]:
    pod = adapters.core.create_namespaced_pod(
        ns, {"metadata": {"name": name}, "spec": {"containers": [{"name": "w", "image": "loraplane-worker"}]}}
    )
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": pod.metadata.uid}


def test_worker_reports_aggregate_into_counts_phase_and_conditions(
    adapters, operators, namespace, scope, wait, kube
) -> None:
    operators(*scope(namespace), "--heartbeat-window", "4")
    adapters.create(namespace, "good", {"baseModel": BASE, "path": "/models/good"})
    adapters.create(namespace, "bad", {"baseModel": BASE, "path": "/models/bad"})
    adapters.create(namespace, "mixed", {"baseModel": BASE, "path": "/models/mixed"})
    ids = {
        n: adapters.wait_status(namespace, n, lambda s: s.get("id"), "an ID")["id"]
        for n in ("good", "bad", "mixed")
    }
    info = {"rank": 8, "alpha": 16.0, "targetModules": ["q_proj", "v_proj"], "sizeBytes": 1234}

    def reports(w: int) -> list[dict[str, Any]]:
        return [
            _report(namespace, "good", ids["good"], "Ready", info=info, onDevice=True),
            _report(
                namespace,
                "bad",
                ids["bad"],
                "Failed",
                reason="RankTooLarge",
                message=f"rank 64 exceeds maxLoraRank 16 on worker {w}",
            ),
            _report(
                namespace,
                "mixed",
                ids["mixed"],
                "Ready" if w == 1 else "Failed",
                **({} if w == 1 else {"reason": "HiddenSizeMismatch", "message": "4096 != 2048"}),
            ),
        ]

    owner1 = _pod(adapters, namespace, "worker-1")
    adapters.create_worker(
        namespace,
        "w1",
        {"baseModel": BASE, "podName": "worker-1", "capacity": CAPACITY},
        {"heartbeatTime": _now(), **_status(reports(1))},
        owner=owner1,
    )
    adapters.create_worker(
        namespace,
        "w2",
        {"baseModel": BASE, "capacity": CAPACITY},
        {"heartbeatTime": _now(3600), **_status(reports(2))},
    )  # Fresh for the whole test.
    # A worker of another base model never counts for these adapters.
    adapters.create_worker(
        namespace,
        "w3",
        {"baseModel": OTHER, "capacity": CAPACITY},
        {"heartbeatTime": _now(3600), **_status([])},
    )

    good = adapters.wait_status(
        namespace, "good", lambda s: s.get("phase") == "Ready" and s["workers"]["total"] == 2, "Ready on 2"
    )
    assert good["workers"] == {"ready": 2, "failed": 0, "total": 2}
    assert good["adapter"]["rank"] == 8 and good["adapter"]["targetModules"] == ["q_proj", "v_proj"]
    conds = {c["type"]: c for c in good["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Validated"]["status"] == "True"

    bad = adapters.wait_status(namespace, "bad", lambda s: s["workers"]["failed"] == 2, "Failed on 2")
    assert bad["workers"] == {"ready": 0, "failed": 2, "total": 2}
    assert bad["message"].startswith(f"worker {namespace}/w1: RankTooLarge: rank 64 exceeds")
    conds = {c["type"]: c for c in bad["conditions"]}
    assert conds["Validated"]["status"] == "False" and conds["Validated"]["reason"] == "RankTooLarge"
    assert conds["Ready"]["status"] == "False"

    mixed = adapters.wait_status(namespace, "mixed", lambda s: s.get("phase") == "Degraded", "Degraded")
    assert mixed["workers"] == {"ready": 1, "failed": 1, "total": 2}
    assert "HiddenSizeMismatch: 4096 != 2048" in mixed["message"]

    # w1's pod goes: its reports stop counting (GC removes the LoRAWorker too, where it runs).
    adapters.core.delete_namespaced_pod("worker-1", namespace, _preload_content=False)
    mixed = adapters.wait_status(
        namespace, "mixed", lambda s: s.get("phase") == "Failed", "w1 gone: Failed", timeout=30
    )
    assert mixed["workers"] == {"ready": 0, "failed": 1, "total": 1}
    good = adapters.wait_status(namespace, "good", lambda s: s["workers"]["total"] == 1, "one worker left")
    assert good["phase"] == "Ready"

    # w2 with a heartbeat older than the window stops counting too.
    adapters.co.patch_namespaced_custom_object_status(
        "loraplane.io", "v1alpha1", namespace, "loraworkers", "w2", {"status": {"heartbeatTime": _now(-10)}}
    )
    good = adapters.wait_status(
        namespace, "good", lambda s: s["workers"]["total"] == 0, "no live worker", timeout=30
    )
    assert good["phase"] == "Registered" and "no live worker" in good["message"]

    def reasons() -> set[str]:
        items = adapters.core.list_namespaced_event(namespace).items
        return {e.reason for e in items if e.involved_object.name == "good"}

    # Each transition under its own reason: the ID, Ready, and back to no live worker. Events are
    # posted in the background after the status write: wait for them, bounded.
    wanted = {"IDAssigned", "Ready", "NoWorkers"}
    wait(lambda: wanted <= reasons(), 10, lambda: f"events {sorted(wanted)}, got {sorted(reasons())}")


@pytest.mark.parametrize("heartbeat", [None, "not-a-time"])
def test_worker_without_valid_heartbeat_never_counts(
    adapters, operators, namespace, scope, heartbeat
) -> None:
    operators(*scope(namespace))
    adapters.create(namespace, "a", {"baseModel": BASE, "path": "/models/a"})
    id_ = adapters.wait_status(namespace, "a", lambda s: s.get("id"), "an ID")["id"]
    status: dict[str, Any] = _status([_report(namespace, "a", id_, "Ready")])
    if heartbeat:
        status["heartbeatTime"] = heartbeat
    try:
        adapters.create_worker(namespace, "w", {"baseModel": BASE, "capacity": CAPACITY}, status)
    except Exception as exc:  # The schema may refuse a non-date heartbeat: then nothing to count anyway.
        assert heartbeat == "not-a-time", exc
    time.sleep(1.5)
    st = adapters.status(namespace, "a")
    assert st["workers"]["total"] == 0 and st["phase"] == "Registered"
