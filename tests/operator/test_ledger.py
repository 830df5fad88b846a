"""The ID ledger deleted or corrupted by hand: allocation stops with a message; recovery is explicit."""

from __future__ import annotations

import pytest

from loraplane.operator.settings import LEDGER_NAME, RECOVER_ANNOTATION

BASE = "meta-llama/Llama-2-7b-hf"
GAP = 1000


def _ledger_next(adapters, ns: str) -> str:
    return adapters.core.read_namespaced_config_map(LEDGER_NAME, ns).data["next"]


def _break(adapters, ns: str, how: str) -> None:
    if how == "deleted":
        adapters.core.delete_namespaced_config_map(LEDGER_NAME, ns)
    elif how == "not-an-integer":
        adapters.core.patch_namespaced_config_map(LEDGER_NAME, ns, {"data": {"next": "banana"}})
    elif how == "below-visible":
        adapters.core.patch_namespaced_config_map(LEDGER_NAME, ns, {"data": {"next": "2"}})


@pytest.mark.parametrize("how", ["deleted", "not-an-integer", "below-visible"])
def test_broken_ledger_stops_then_recovers_above_every_visible_id(
    adapters, operators, namespace, scope, how
) -> None:
    op = operators(*scope(namespace), "--safety-gap", str(GAP))
    for i in range(3):
        adapters.create(namespace, f"a{i}", {"baseModel": BASE, "path": f"/models/a{i}"})
    ids = [adapters.wait_status(namespace, f"a{i}", lambda s: s.get("id"), "an ID")["id"] for i in range(3)]
    # A worker still reports an ID higher than any adapter shows (an adapter deleted since).
    adapters.create_worker(
        namespace,
        "w1",
        {
            "baseModel": BASE,
            "capacity": {"maxLoras": 4, "maxLoraRank": 16, "maxCpuLoras": 8, "cacheBytes": 0},
        },
        {"readyIds": {"0": "40"}},
    )
    visible = max(*ids, 40)
    op.stop()
    _break(adapters, namespace, how)

    operators(*scope(namespace), "--safety-gap", str(GAP))
    adapters.create(namespace, "waiting", {"baseModel": BASE, "path": "/models/waiting"})
    st = adapters.wait_status(namespace, "waiting", lambda s: s.get("phase") == "Pending", "phase Pending")
    assert "id" not in st
    reason = "LedgerMissing" if how == "deleted" else "LedgerCorrupted"
    cond = {c["type"]: c for c in st["conditions"]}["IDAssigned"]
    assert cond["status"] == "False" and cond["reason"] == reason
    safe = visible + GAP + 1
    assert f"--from-literal=next={safe}" in st["message"] and "--recover-ledger" in st["message"], st[
        "message"
    ]
    if how != "deleted":
        assert _ledger_next(adapters, namespace) in ("banana", "2")  # Untouched: nothing guessed.

    # Explicit recovery: the flag on one operator (the other, still stopped, follows the ledger).
    operators(*scope(namespace), "--safety-gap", str(GAP), "--recover-ledger")
    st = adapters.wait_status(namespace, "waiting", lambda s: s.get("id"), "an ID after recovery", timeout=30)
    assert st["id"] >= safe > visible
    assert int(_ledger_next(adapters, namespace)) > st["id"]
    assert [adapters.status(namespace, f"a{i}")["id"] for i in range(3)] == ids


def test_annotation_recovers_a_corrupted_ledger(adapters, operators, namespace, scope) -> None:
    # Block size 1: every ID needs a ledger write, so the corruption is noticed at once.
    operators(*scope(namespace), "--safety-gap", str(GAP), "--block-size", "1")
    adapters.create(namespace, "a", {"baseModel": BASE, "path": "/models/a"})
    first = adapters.wait_status(namespace, "a", lambda s: s.get("id"), "an ID")["id"]
    _break(adapters, namespace, "not-an-integer")
    adapters.delete(namespace, "a")  # Its ID is no longer visible, but the running operator saw it.
    adapters.create(namespace, "b", {"baseModel": BASE, "path": "/models/b"})
    st = adapters.wait_status(namespace, "b", lambda s: s.get("phase") == "Pending", "phase Pending")
    assert "LedgerCorrupted" in str(st["conditions"]) and "'banana', not an integer" in st["message"]
    adapters.core.patch_namespaced_config_map(
        LEDGER_NAME, namespace, {"metadata": {"annotations": {RECOVER_ANNOTATION: "true"}}}
    )
    st = adapters.wait_status(namespace, "b", lambda s: s.get("id"), "an ID after recovery", timeout=30)
    assert st["id"] == first + GAP + 1
    ledger = adapters.core.read_namespaced_config_map(LEDGER_NAME, namespace)
    assert (
        RECOVER_ANNOTATION not in (ledger.metadata.annotations or {}) and int(ledger.data["next"]) > st["id"]
    )


def test_missing_ledger_namespace_is_a_warning_event_naming_the_fix(
    adapters, operators, namespace, scope, wait
) -> None:
    operators(*scope(namespace), "--ledger-namespace", "no-such-namespace")
    adapters.create(namespace, "a", {"baseModel": BASE, "path": "/models/a"})
    st = adapters.wait_status(namespace, "a", lambda s: s.get("phase") == "Pending", "phase Pending")
    ready = {c["type"]: c for c in st["conditions"]}["Ready"]
    assert ready["reason"] == "LedgerMissing" and "no-such-namespace" in st["message"]
    assert "--ledger-namespace" in st["message"]
    (event,) = wait(
        lambda: [
            e
            for e in adapters.core.list_namespaced_event(namespace).items
            if e.involved_object.name == "a" and e.type == "Warning"
        ],
        10,
        "a Warning Event on a",
    )
    assert event.reason == "LedgerMissing" and "no-such-namespace" in event.message
