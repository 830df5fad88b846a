"""The pure rules (no cluster): ledger checks, ID decisions, name order, aggregation, phases."""

from __future__ import annotations

import pytest

from loraplane.crds.models import ID_MAX, LoRAAdapterStatus, version_of
from loraplane.operator import aggregate, allocation
from loraplane.operator.names import Claim, NameIndex
from loraplane.operator.settings import OperatorSettings


@pytest.mark.parametrize(
    ("raw", "visible", "reason"),
    [
        (None, 0, "LedgerCorrupted"),
        ("banana", 0, "LedgerCorrupted"),
        ("", 0, "LedgerCorrupted"),
        ("0", 0, "LedgerCorrupted"),
        ("-5", 0, "LedgerCorrupted"),
        ("7", 7, "LedgerCorrupted"),  # equal to a visible ID: handing it out would reuse it
        ("3", 10, "LedgerCorrupted"),
        (str(ID_MAX + 1), 0, "LedgerExhausted"),
    ],
)
def test_check_ledger_refuses(raw, visible, reason) -> None:
    with pytest.raises(allocation.LedgerError) as err:
        allocation.check_ledger(raw, visible)
    assert err.value.reason == reason


def test_check_ledger_accepts_above_visible() -> None:
    assert allocation.check_ledger(" 11 ", 10) == 11


def test_decide_keeps_same_version_and_records_previous_on_change() -> None:
    v = version_of("/m/a", None)
    five = LoRAAdapterStatus(id=5, version=v)
    assert allocation.decide(five, v) == allocation.IdDecision(keep=True)
    assert allocation.decide(five, version_of("/m/a", "r2")) == allocation.IdDecision(
        keep=False, previous_id=5
    )
    assert allocation.decide(None, v) == allocation.IdDecision(keep=False)
    assert version_of("/m/a", None) != version_of("/m/b", None)
    assert version_of("/m/a", None) == version_of("/m/a", "")  # no revision = empty


def test_a_digest_is_part_of_the_version() -> None:
    """spec.digest alone (same path) is a new version; without one, the version is the value written before
    digests existed (sha256 of "path\nrevision"), so no adapter gets a new ID on upgrade."""
    import hashlib

    d1, d2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    legacy = hashlib.sha256(b"/m/a\nr1").hexdigest()[:16]
    assert version_of("/m/a", "r1") == version_of("/m/a", "r1", None) == legacy
    versions = {version_of("/m/a", "r1", d) for d in (None, d1, d2)} | {version_of("/m/a", "r2", d1)}
    assert len(versions) == 4  # adding, changing a digest, and a revision with the same digest all move it
    five = LoRAAdapterStatus(id=5, version=legacy)
    assert allocation.decide(five, version_of("/m/a", "r1", d1)) == allocation.IdDecision(
        keep=False, previous_id=5
    )


def test_restore_hint_names_a_safe_value_and_both_ways() -> None:
    s = OperatorSettings(ledger_namespace="ops", safety_gap=100)
    hint = allocation.restore_hint(s, 41)
    assert "kubectl -n ops create configmap loraplane-id-ledger --from-literal=next=142" in hint
    assert "--recover-ledger" in hint and "loraplane.io/recover-ledger=true" in hint


def test_oldest_claim_wins_ties_by_namespace_name() -> None:
    idx = NameIndex()
    key = ("base", "n")
    idx.claim(key, Claim("2026-01-01T00:00:01Z", "b", "x"))
    idx.claim(key, Claim("2026-01-01T00:00:01Z", "a", "y"))
    idx.claim(key, Claim("2026-01-01T00:00:02Z", "0", "z"))
    assert idx.holder(key).ref == "a/y"
    assert idx.release("a/y") == {key} and idx.holder(key).ref == "b/x"
    # Renaming moves the claim.
    assert idx.claim(("base", "other"), Claim("2026-01-01T00:00:01Z", "b", "x")) == {key, ("base", "other")}
    assert idx.holder(key).ref == "0/z"


def _w(
    name: str,
    reports: dict,
    base: str = "m",
    hb: float | None = 100.0,
    pod: str | None = None,
    alive: bool = True,
) -> aggregate.WorkerView:
    states = {i: r["state"] if r["state"] in ("Ready", "Failed") else "Loading" for i, r in reports.items()}
    return aggregate.WorkerView("ns", name, base, pod, hb, states=states, details=reports, pod_alive=alive)


@pytest.mark.parametrize(
    ("workers", "counts", "phase"),
    [
        ([], {"ready": 0, "failed": 0, "total": 0}, "Registered"),
        ([_w("a", {1: {"state": "Ready"}})], {"ready": 1, "failed": 0, "total": 1}, "Ready"),
        ([_w("a", {1: {"state": "Prefetching"}})], {"ready": 0, "failed": 0, "total": 1}, "Registered"),
        ([_w("a", {1: {"state": "Failed", "reason": "R"}})], {"ready": 0, "failed": 1, "total": 1}, "Failed"),
        (
            [_w("a", {1: {"state": "Ready"}}), _w("b", {1: {"state": "Failed"}})],
            {"ready": 1, "failed": 1, "total": 2},
            "Degraded",
        ),
        (
            [_w("a", {1: {"state": "Ready"}}, base="other")],
            {"ready": 0, "failed": 0, "total": 0},
            "Registered",
        ),
        ([_w("a", {1: {"state": "Ready"}}, hb=10.0)], {"ready": 0, "failed": 0, "total": 0}, "Registered"),
        ([_w("a", {1: {"state": "Ready"}}, hb=None)], {"ready": 0, "failed": 0, "total": 0}, "Registered"),
        (
            [_w("a", {1: {"state": "Ready"}}, pod="p", alive=False)],
            {"ready": 0, "failed": 0, "total": 0},
            "Registered",
        ),
        ([_w("a", {2: {"state": "Ready"}})], {"ready": 0, "failed": 0, "total": 1}, "Registered"),
    ],
)
def test_aggregate_counts_and_phase(workers, counts, phase) -> None:
    agg = aggregate.aggregate(1, None, "m", workers, now=110.0, window=60.0)
    assert agg.counts == counts
    assert aggregate.phase_of(agg)[0] == phase


def test_first_failure_message_and_previous_id_switch() -> None:
    workers = [
        _w("b", {1: {"state": "Failed", "reason": "RankTooLarge", "message": "rank 64 > 16"}}),
        _w("c", {1: {"state": "Failed", "reason": "Other", "message": "x"}, 7: {"state": "Ready"}}),
    ]
    agg = aggregate.aggregate(1, 7, "m", workers, now=110.0, window=60.0)
    assert agg.failure == "worker ns/b: RankTooLarge: rank 64 > 16" and agg.failure_reason == "RankTooLarge"
    assert agg.previous_in_use and not agg.all_switched
    workers[1].states.pop(7)
    assert aggregate.aggregate(1, 7, "m", workers, now=110.0, window=60.0).all_switched
