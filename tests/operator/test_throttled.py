"""An adapter's Throttled condition from its workers' reports (pure functions, no cluster): a worker lists
the IDs it answered 429 for over spec.limits in LoRAWorker status.throttledIds; the operator turns that
into Throttled=True (OverLimit, naming the worker) and back to False when no live worker lists it, on
adapters that have spec.limits only; a change of that set alone marks the adapter changed."""

from __future__ import annotations

from typing import Any

from loraplane.crds import conditions as cond
from loraplane.crds.models import parse_adapter, version_of
from loraplane.operator import aggregate, status

NOW, WINDOW = 110.0, 60.0


def _worker(throttled: str | None) -> dict[str, Any]:
    st: dict[str, Any] = {"heartbeatTime": "1970-01-01T00:01:40Z", "readyIds": {"0": "7"}}
    if throttled:
        st["throttledIds"] = throttled
    return {
        "metadata": {"name": "w1", "namespace": "ns"},
        "spec": {
            "baseModel": "m",
            "capacity": {"maxLoras": 1, "maxLoraRank": 8, "maxCpuLoras": 1, "cacheBytes": 0},
        },
        "status": st,
    }


def _status(view: aggregate.WorkerView, **spec: Any) -> dict[str, Any]:
    obj = {
        "metadata": {"name": "a", "namespace": "ns", "generation": 1},
        "spec": {"baseModel": "m", "path": "/models/a", **spec},
        "status": {},
    }
    adapter = parse_adapter(obj)
    ids = status.IdState(7, version_of(adapter.spec.path, None))
    agg = aggregate.aggregate(7, None, "m", [view], NOW, WINDOW)
    st = status.desired(obj, adapter, ids, None, agg)
    return {c["type"]: c for c in st["conditions"]}


def test_throttled_condition_follows_the_workers_reports() -> None:
    quiet, changed = aggregate.worker_view(_worker(None))
    assert quiet is not None and changed == {7}
    limits = {"limits": {"maxConcurrentRequests": 2}}
    assert _status(quiet, **limits)[cond.THROTTLED]["status"] == "False"
    assert cond.THROTTLED not in _status(quiet), "no limits, no Throttled condition"

    throttled, changed = aggregate.worker_view(_worker("5,7"), quiet)
    assert throttled is not None and changed == {5, 7}, "the throttled set alone changes adapters"
    c = _status(throttled, **limits)[cond.THROTTLED]
    assert (c["status"], c["reason"]) == ("True", cond.OVER_LIMIT) and "ns/w1" in c["message"]

    again, changed = aggregate.worker_view(_worker(None), throttled)
    assert again is not None and changed == {5, 7}
    assert _status(again, **limits)[cond.THROTTLED]["reason"] == cond.WITHIN_LIMITS
