"""An adapter's Throttled condition from its workers' reports (pure functions, no cluster): a worker lists
the IDs it answered 429 for over spec.limits in LoRAWorker status.throttledIds; the operator turns that
into Throttled=True (OverLimit, naming the worker) and back to False when no live worker lists it, on
adapters that have spec.limits only; a change of that set alone marks the adapter changed. Each flip,
and only a flip, is an Event."""

from __future__ import annotations

from typing import Any

from loraplane.crds import conditions as cond
from loraplane.crds.models import parse_adapter, version_of
from loraplane.operator import aggregate, events, status

NOW, WINDOW = 110.0, 60.0


def _worker(throttled: str | None, name: str = "w1") -> dict[str, Any]:
    st: dict[str, Any] = {"heartbeatTime": "1970-01-01T00:01:40Z", "readyIds": {"0": "7"}}
    if throttled:
        st["throttledIds"] = throttled
    return {
        "metadata": {"name": name, "namespace": "ns"},
        "spec": {
            "baseModel": "m",
            "capacity": {"maxLoras": 1, "maxLoraRank": 8, "maxCpuLoras": 1, "cacheBytes": 0},
        },
        "status": st,
    }


def _status(view: aggregate.WorkerView, **spec: Any) -> dict[str, Any]:
    return {c["type"]: c for c in _full_status([view], **spec)["conditions"]}


def _full_status(views: list[aggregate.WorkerView], **spec: Any) -> dict[str, Any]:
    obj = {
        "metadata": {"name": "a", "namespace": "ns", "generation": 1},
        "spec": {"baseModel": "m", "path": "/models/a", **spec},
        "status": {},
    }
    adapter = parse_adapter(obj)
    ids = status.IdState(7, version_of(adapter.spec.path, None))
    agg = aggregate.aggregate(7, None, "m", views, NOW, WINDOW)
    return status.desired(obj, adapter, ids, None, agg)


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


def test_an_event_when_throttling_starts_and_when_it_ends_not_per_report() -> None:
    limits = {"limits": {"tokensPerMinute": 1000}}
    quiet = aggregate.worker_view(_worker(None))[0]
    one = aggregate.worker_view(_worker("7"), quiet)[0]
    other = aggregate.worker_view(_worker("7", name="w2"))[0]
    assert quiet is not None and one is not None and other is not None
    calm, hot, hotter = (_full_status(v, **limits) for v in ([quiet], [one], [one, other]))

    started = events.transition(calm, hot)
    assert started is not None and (started.reason, started.warning) == (cond.OVER_LIMIT, True)
    assert "ns/w1" in started.message, started
    # A second worker refusing too changes the condition's message, not whether it is throttled.
    assert hot["conditions"] != hotter["conditions"]
    assert events.transition(hot, hotter) is None
    ended = events.transition(hotter, calm)
    assert ended is not None and (ended.reason, ended.warning) == (cond.WITHIN_LIMITS, False)
    # Limits removed while throttled: the condition goes, and so does the throttling.
    gone = events.transition(hot, _full_status([one]))
    assert gone is not None and gone.reason == cond.WITHIN_LIMITS and "spec.limits removed" in gone.message
    assert events.transition(calm, _full_status([quiet])) is None, "never throttled: nothing to say"
