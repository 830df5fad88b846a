"""Status computation and the Event for each transition, as pure functions (no cluster): every failure
is named by its own reason (a Warning), waiting on a worker's capacity shows in the adapter's status,
and an Event never says the same thing twice."""

from __future__ import annotations

from typing import Any

import pytest

from loraplane.crds import conditions as cond
from loraplane.crds.models import parse_adapter, version_of
from loraplane.errors import PermanentError
from loraplane.operator import aggregate, events, status
from loraplane.operator.allocation import LEDGER_MISSING, LedgerError

NOW, WINDOW = 110.0, 60.0


def _obj(st: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "loraplane.io/v1alpha1",
        "kind": "LoRAAdapter",
        "metadata": {"name": "a", "namespace": "ns", "generation": 2, "uid": "u"},
        "spec": {"baseModel": "m", "path": "/models/a", **spec},
        "status": st or {},
    }


def _compute(
    obj: dict[str, Any],
    reports: dict[int, dict[str, Any]] | None,
    *,
    holder: str | None = None,
    waiting: Any = None,
) -> dict[str, Any]:
    adapter = parse_adapter(obj)
    version = version_of(adapter.spec.path, adapter.spec.revision)
    ids = status.IdState(None, version, waiting=waiting) if waiting else status.IdState(7, version)
    workers = []
    if reports is not None:
        states = {
            i: r["state"] if r["state"] in ("Ready", "Failed") else "Loading" for i, r in reports.items()
        }
        workers = [aggregate.WorkerView("ns", "w1", "m", None, 100.0, states=states, details=reports)]
    agg = aggregate.aggregate(7, None, "m", workers, NOW, WINDOW)
    return status.desired(obj, adapter, ids, holder, agg)


def _conds(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in st["conditions"]}


CACHE_FULL = {
    7: {"state": "Prefetching", "reason": "CacheFull", "message": "cache full: 2 GiB served (retrying in 4s)"}
}
RANK = {7: {"state": "Failed", "reason": "RankTooLarge", "message": "rank 64 exceeds maxLoraRank 16"}}
LEDGER = LedgerError(LEDGER_MISSING, "the ID ledger configmap ns/l is missing while IDs up to 9 are in use")


@pytest.mark.parametrize(
    ("reports", "kw", "phase", "reason", "message", "warning"),
    [
        (None, {}, "Registered", cond.NO_WORKERS, "no live worker serves this base model yet", False),
        ({}, {}, "Registered", cond.LOADING, "loading on 1 workers", False),
        (CACHE_FULL, {}, "Registered", "CacheFull", "waiting on 1 of 1 workers; first: worker ns/w1: CacheFull: cache full", True),
        ({7: {"state": "Validating", "reason": cond.WAITING_FOR_ENGINE, "message": "m"}}, {}, "Registered", cond.WAITING_FOR_ENGINE, "WaitingForEngine", False),
        ({7: {"state": "Ready"}}, {}, "Ready", cond.READY_REASON, None, False),
        (RANK, {}, "Failed", "RankTooLarge", "worker ns/w1: RankTooLarge: rank 64 exceeds", True),
        ({}, {"waiting": LEDGER}, "Pending", LEDGER_MISSING, "waiting for an ID: the ID ledger configmap", True),
        ({}, {"holder": "other/b"}, "Pending", cond.NAME_TAKEN, "is held by other/b (the oldest claimant)", True),
    ],
)  # fmt: skip
def test_phase_ready_reason_and_event(reports, kw, phase, reason, message, warning) -> None:
    before = _compute(_obj(), {}) if reason != cond.LOADING else _compute(_obj(), None)
    st = _compute(_obj(before), reports, **kw)
    ready = _conds(st)["Ready"]
    assert (st["phase"], ready["reason"]) == (phase, reason)
    assert ready["status"] == ("True" if phase == "Ready" else "False")
    if message is None:
        assert "message" not in st
    else:
        assert message in st["message"] and message in ready["message"]
    assert all(c["observedGeneration"] == 2 for c in st["conditions"]) and st["observedGeneration"] == 2
    note = events.transition(before, st)
    assert note is not None and note.reason == reason and note.warning is warning, note


def test_name_taken_event_says_it_once() -> None:
    before = _compute(_obj(), {})
    after = _compute(_obj(before), {}, holder="other/b")
    note = events.transition(before, after)
    assert note is not None and note.reason == cond.NAME_TAKEN and note.warning
    assert note.message.count("is held by other/b") == 1, note.message


def test_first_status_of_a_new_adapter_is_one_normal_event_named_by_its_id() -> None:
    st = _compute(_obj(), None)
    note = events.transition({}, st)
    assert note is not None and (note.reason, note.warning) == (events.ID_ASSIGNED, False)
    assert note.message.startswith("assigned ID 7 to version") and "phase Registered" in note.message


def test_no_event_when_only_the_wording_changes() -> None:
    one = _compute(_obj(), {})
    two = _compute(_obj(one), {7: {"state": "Prefetching"}})
    assert events.transition(one, two) is None


def test_invalid_spec_fails_with_its_reason() -> None:
    obj = _obj()
    st = status.invalid(obj, PermanentError("InvalidSpec", "spec.path: relative paths are not accepted"))
    assert st["phase"] == "Failed" and {c["reason"] for c in st["conditions"]} == {"InvalidSpec"}
    note = events.transition({}, st)
    assert note is not None and note.reason == "InvalidSpec" and note.warning
