"""operator/placement.py as pure functions: spread, moves on a worker leaving or joining, capacity, demand."""

from __future__ import annotations

import pytest

from loraplane.operator import placement as pl

N, K = 2000, 2


def _place_all(workers: list[str], loads: pl.Loads, joined: str | None = None) -> dict[str, tuple[str, ...]]:
    pool = dict.fromkeys(workers, pl.Capacity())
    out = {}
    for i in range(N):
        a = f"ns/a{i}"
        d = pl.place(a, f"uid-{i}", K, pool, loads, joined=[joined] if joined else ())
        loads.set(a, d.workers, 0)
        out[a] = d.workers
    return out


def _moves(before: dict[str, tuple[str, ...]], after: dict[str, tuple[str, ...]]) -> int:
    return sum(len(set(after[a]) - set(before[a])) for a in after)


def test_spread_and_moves_on_leave_and_join() -> None:
    workers = [f"ns/w{i}" for i in range(8)]
    loads = pl.Loads()
    first = _place_all(workers, loads)
    counts = {w: sum(w in p for p in first.values()) for w in workers}
    target = N * K / len(workers)
    assert all(abs(c - target) <= 0.2 * target for c in counts.values()), counts
    # w7 leaves: only its adapters move, each keeping its other worker.
    gone = _place_all(workers[:-1], loads)
    assert _moves(first, gone) == counts["ns/w7"]
    assert all(set(first[a]) - {"ns/w7"} <= set(gone[a]) for a in first)
    # It comes back: what it had returns to it; nothing moves but onto it.
    back = _place_all(workers, loads, joined="ns/w7")
    had = [a for a in first if "ns/w7" in first[a]]
    # All but those the bounded load kept off their first choices while the pool filled up.
    assert sum("ns/w7" in back[a] for a in had) >= 0.98 * len(had)
    assert _moves(gone, back) == sum("ns/w7" in p for p in back.values()) <= 1.5 * N * K / len(workers)
    # A ninth worker: about N x K / 9 assignments move, all onto it, each from the adapter's last-ranked.
    added = _place_all([*workers, "ns/w8"], loads, joined="ns/w8")
    moved = _moves(back, added)
    assert moved <= 1.5 * N * K / 9 and moved == sum("ns/w8" in p for p in added.values())
    assert all(len(set(added[a]) & set(back[a])) >= K - 1 for a in added)


def test_a_full_worker_is_skipped_with_the_reason_never_over_filled() -> None:
    loads = pl.Loads()
    pool = {"ns/w0": pl.Capacity(max_adapters=1), "ns/w1": pl.Capacity(cache_bytes=100)}
    loads.know_size("ns/big", 80)
    loads.know_size("ns/small", 30)
    d = pl.place("ns/big", "u1", 2, pool, loads)
    assert set(d.workers) == {"ns/w0", "ns/w1"} and d.reason == pl.PLACED
    loads.set("ns/big", d.workers, 80)
    d = pl.place("ns/small", "u2", 2, pool, loads)
    assert d.workers == () and d.reason == pl.NO_CAPACITY
    assert "ns/w0 holds 1 of its 1 adapters (--max-adapters)" in d.message
    assert "ns/w1 has 80 of 100 cache bytes placed, 30 more do not fit (--cache-bytes)" in d.message
    # An adapter whose size is not known yet counts as the mean of the known ones.
    assert loads.size_of("ns/new") == 55
    # Too few workers is not a capacity problem.
    d = pl.place("ns/x", "u3", 3, {"ns/w9": pl.Capacity()}, pl.Loads())
    assert d.workers == ("ns/w9",) and d.reason == pl.NOT_ENOUGH_WORKERS


@pytest.mark.parametrize(
    ("samples", "expected"),
    [
        # (seconds, waiting) -> the extra replicas after each sample; up 4/replica for 10 s, down after 60 s quiet
        ([(0, 8), (5, 8), (9, 0), (12, 8), (21, 8)], [0, 0, 0, 0, 0]),  # never high for 10 s in a row
        ([(0, 8), (5, 8), (10, 8)], [0, 0, 1]),
        ([(0, 8), (10, 8), (20, 12), (30, 12)], [0, 1, 2, 3]),  # 12 waiting on 3 replicas: still high
        ([(0, 8), (10, 8), (20, 4), (30, 4)], [0, 1, 1, 1]),  # 4 on 2 replicas: below 4 per replica
        ([(0, 8), (10, 8), (11, 0), (40, 0), (71, 0)], [0, 1, 1, 1, 0]),  # quiet 60 s: one back
        ([(0, 8), (10, 8), (11, 0), (40, 1), (71, 0), (100, 0)], [0, 1, 1, 1, 1, 1]),  # one waiting resets
    ],
)
def test_demand_rule_has_hysteresis(samples: list[tuple[float, int]], expected: list[int]) -> None:
    demand = pl.Demand(up_waiting=4, up_s=10, down_s=60)
    extra, got = 0, []
    for t, waiting in samples:
        extra = demand.step("ns/a", waiting, 1 + extra, extra, room=2 - extra + 1, now=t)
        got.append(extra)
    assert got == expected
