"""Fair share and priorities in the built-in scheduler, stepped by hand (exact step counts, no timing).

A real engine (tiny Llama) without its thread: the test submits requests of two flows and calls
``run_once`` itself. An aggressor fills every row with long requests; a victim's short request must get
its first token within a couple of steps under the fair policy (it preempts an aggressor request, which
is parked with its KV and later resumes where it stopped), and only after the aggressor's queue under
FCFS. Preempted requests must end with exactly the tokens they get unpreempted, and no work is lost:
the KV of a preempted request is freed (and read again) only when an admission needs that KV.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from loraplane.worker.builtin.scheduler import SchedulerSettings
from loraplane.worker.builtin.service import Engine, EngineSettings
from loraplane.worker.inference.engines import Output
from loraplane.worker.inference.fairness import FairShare, Tenant
from loraplane.worker.inference.sampling import SamplingParams

LONG = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
KV_BYTES = 2 * 2 * 2 * 16 * 4  # K and V of one token of the tiny Llama: 2 layers, 2 KV heads of 16, fp32
SHORT = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@dataclass
class Call:
    submitted_at: int
    tokens: list[int] = field(default_factory=list)
    first_at: int | None = None
    reason: str | None = None


class Driver:
    def __init__(self, model_dir: Path, kv_tokens: int = 0, **sched: Any) -> None:
        settings = EngineSettings(
            max_model_len=128, kv_cache_bytes=kv_tokens * KV_BYTES, scheduler=SchedulerSettings(**sched)
        )
        self.engine = Engine.load(model_dir, settings)
        self.steps = 0
        self._n = 0

    def submit(self, tenant: Tenant, prompt: list[int], params: SamplingParams) -> Call:
        call = Call(self.steps)

        def on_output(out: Output) -> None:
            if out.token_ids and call.first_at is None:
                call.first_at = self.steps
            call.tokens.extend(out.token_ids)
            if out.finish_reason is not None:
                call.reason = out.finish_reason

        self._n += 1
        self.engine.submit(
            request_id=f"r{self._n}",
            model="base",
            adapter=None,
            prompt_ids=prompt,
            params=params,
            on_output=on_output,
            tenant=tenant,
        )
        return call

    def metric(self, name: str, **labels: str) -> float:
        value = self.engine.metrics.registry.get_sample_value(f"loraplane_worker_{name}_total", labels)
        return -1.0 if value is None else value

    def step(self, n: int = 1) -> None:
        for _ in range(n):
            self.steps += 1
            self.engine.scheduler.run_once()

    def until_done(self, calls: list[Call], max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if all(c.reason is not None for c in calls):
                break
            self.step()
        assert all(c.reason == "length" for c in calls), [c.reason for c in calls]
        s = self.engine.scheduler
        assert (s.running, s.waiting, s.queued, s.fair.flows) == ([], [], 0, 0), "state left behind"
        kv = self.engine.runner.kv
        assert kv.free_tokens == kv.total_tokens


@pytest.fixture
def drivers() -> Any:
    made: list[Driver] = []

    def make(model_dir: Path, kv_tokens: int = 0, **sched: Any) -> Driver:
        made.append(Driver(model_dir, kv_tokens, **sched))
        return made[-1]

    yield make
    for d in made:
        d.engine.stop()


def prompt(n: int, start: int) -> list[int]:
    return [3 + (start + 7 * i) % 240 for i in range(n)]


AGGRESSOR, VICTIM = Tenant("/aggressor"), Tenant("/victim")


def flood(d: Driver) -> tuple[list[Call], Call]:
    """12 long aggressor requests (4 rows: all full), then one short victim request."""
    aggressor = [d.submit(AGGRESSOR, prompt(6, start=i), LONG) for i in range(12)]
    d.step(5)
    victim = d.submit(VICTIM, prompt(5, start=99), SHORT)
    return aggressor, victim


def test_victim_gets_a_row_within_two_steps_under_fair_share_and_waits_under_fcfs(
    tiny_llama: Path, drivers: Any
) -> None:
    fcfs = drivers(tiny_llama, max_num_seqs=4, policy="fcfs")
    aggressor_fcfs, victim_fcfs = flood(fcfs)
    fcfs.until_done([*aggressor_fcfs, victim_fcfs])
    fair = drivers(tiny_llama, max_num_seqs=4, policy="fair")
    aggressor_fair, victim_fair = flood(fair)
    fair.until_done([*aggressor_fair, victim_fair])

    assert victim_fair.first_at is not None and victim_fcfs.first_at is not None
    waited_fair = victim_fair.first_at - victim_fair.submitted_at
    waited_fcfs = victim_fcfs.first_at - victim_fcfs.submitted_at
    assert waited_fair <= 2, f"fair: the victim waited {waited_fair} steps for its first token"
    assert waited_fcfs >= 60, f"fcfs: the victim waited only {waited_fcfs} steps (the test shows nothing)"
    # Nothing answered wrongly: the preempted aggressor request (read again) ends with the same tokens.
    assert [c.tokens for c in aggressor_fair] == [c.tokens for c in aggressor_fcfs]
    assert victim_fair.tokens == victim_fcfs.tokens
    # Work-conserving: the fair run took no more steps than FCFS, bar the one re-read.
    assert fair.steps <= fcfs.steps + 2, (fair.steps, fcfs.steps)


def test_preempted_requests_keep_their_kv_and_resume(tiny_llama: Path, drivers: Any) -> None:
    """Victims one after another, each admitted within two steps by parking an aggressor row: nothing is
    read again (recomputed) and every output equals FCFS's. (Before parking, each victim took the newest
    row, often the one readmitted for the previous victim, which read its prompt and output again.)"""
    calls: dict[str, list[Call]] = {}
    for policy in ("fcfs", "fair"):
        d = drivers(tiny_llama, max_num_seqs=4, policy=policy)
        aggressor, first = flood(d)
        victims = [first]
        for i in range(3):
            d.step(8)
            victims.append(d.submit(VICTIM, prompt(5, start=120 + i), SHORT))
        d.until_done([*aggressor, *victims])
        calls[policy] = aggressor + victims
        if policy == "fair":
            waits = [v.first_at - v.submitted_at for v in victims if v.first_at is not None]
            assert len(waits) == 4 and max(waits) <= 2, waits
            assert d.metric("preemptions", kv="kept") == 4
            assert d.metric("preemptions", kv="freed") in (0.0, -1.0)
            assert d.metric("recomputed_tokens") in (0.0, -1.0), "a preemption lost work"
    assert [c.tokens for c in calls["fair"]] == [c.tokens for c in calls["fcfs"]]


def test_a_request_admitted_in_a_step_is_not_preempted_by_a_later_one(tiny_llama: Path, drivers: Any) -> None:
    """A row frees; the next request of a flow over its share takes it, then a newcomer of another flow
    preempts in the same step. It must take a row that ran before, not the one just admitted (which,
    taken back before it ever ran, failed its step with SequenceUnknown)."""
    d = drivers(tiny_llama, max_num_seqs=3)
    bulk = Tenant("/bulk")
    short = d.submit(bulk, prompt(6, start=0), SHORT)
    longs = [d.submit(bulk, prompt(6, start=1 + i), LONG) for i in range(3)]  # the third waits for a row
    d.step(4)
    assert short.reason == "length", "the short request ended and freed a row"
    newcomer = d.submit(VICTIM, prompt(5, start=99), SHORT)
    d.step(1)
    assert newcomer.first_at == newcomer.submitted_at + 1
    assert longs[2].first_at == newcomer.first_at, "the request that took the freed row ran in that step"
    d.until_done([short, *longs, newcomer])


def test_preemption_for_kv_reads_again_only_what_it_must(tiny_llama: Path, drivers: Any) -> None:
    """A KV pool the aggressor's rows fill exactly: a victim's KV must come from a parked row, whose KV
    is freed and read again (recompute); outputs stay equal to FCFS's. When a row's last token is in
    the step being planned, the victim waits that step instead of making anyone read again."""
    kv_tokens = 4 * 48  # four rows of 6 + 40 tokens (three blocks of 16 each)
    outs: dict[str, list[Call]] = {}
    for policy in ("fcfs", "fair"):
        d = drivers(tiny_llama, kv_tokens=kv_tokens, max_num_seqs=4, policy=policy)
        aggressor, victim = flood(d)
        d.until_done([*aggressor, victim])
        outs[policy] = [*aggressor, victim]
        if policy == "fair":
            assert victim.first_at is not None and victim.first_at - victim.submitted_at <= 2
            assert d.metric("recomputed_tokens") > 0, "the parked row's KV went to the victim"
    assert [c.tokens for c in outs["fair"]] == [c.tokens for c in outs["fcfs"]]

    d = drivers(tiny_llama, kv_tokens=16 + 3 * 48, max_num_seqs=4)  # full again: one block, three of three
    ending = d.submit(
        AGGRESSOR, prompt(6, start=0), SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    )
    others = [d.submit(AGGRESSOR, prompt(6, start=1 + i), LONG) for i in range(3)]
    d.step(9)  # the first request's tenth and last token is in the next step
    victim = d.submit(VICTIM, prompt(5, start=99), SHORT)
    d.step(1)
    assert ending.reason == "length" and victim.first_at is None
    d.step(1)
    assert victim.first_at == victim.submitted_at + 2
    d.until_done([ending, *others, victim])
    assert d.metric("recomputed_tokens") in (0.0, -1.0) and d.metric("preemptions", kv="kept") in (0.0, -1.0)


def test_batch_flood_leaves_rows_for_interactive(tiny_llama: Path, drivers: Any) -> None:
    d = drivers(tiny_llama, max_num_seqs=8, batch_share=0.75)
    batch = Tenant("/bulk", batch=True)
    flood_calls = [d.submit(batch, prompt(6, start=i), LONG) for i in range(20)]
    d.step(3)
    running = d.engine.scheduler.running
    assert len(running) == 6, "batch holds at most batch_share of the rows"
    interactive = [d.submit(Tenant("/chat"), prompt(5, start=50 + i), SHORT) for i in range(2)]
    d.step(1)
    assert all(c.first_at == c.submitted_at + 1 for c in interactive), [
        (c.submitted_at, c.first_at) for c in interactive
    ]
    # An interactive burst beyond the reserved rows takes rows back from batch (preemption).
    burst = [d.submit(Tenant("/chat"), prompt(5, start=70 + i), SHORT) for i in range(4)]
    d.step(2)
    assert all(c.first_at is not None and c.first_at <= c.submitted_at + 2 for c in burst)
    d.until_done([*flood_calls, *interactive, *burst])


def test_virtual_token_counter_shares_by_weight() -> None:
    """Two backlogged flows, weight 2 and 1, requests of equal cost: admission alternates 2:1."""
    fair = FairShare()
    heavy, light = Tenant("/heavy", weight=2.0), Tenant("/light")
    waiting = [(heavy, i) for i in range(30)] + [(light, i) for i in range(30)]
    for t, _ in waiting:
        fair.arrive(t.flow)
    admitted: list[str] = []
    for _ in range(30):  # one admission per "step", each costing 10 prompt tokens
        t, i = next(fair.order(waiting, lambda r: r[0]))
        waiting.remove((t, i))
        fair.admitted(t, 10)
        admitted.append(t.flow)
    assert admitted.count("/heavy") == 20 and admitted.count("/light") == 10, admitted
    # A flow that was idle is lifted to the others' counter: no credit for its idle time.
    fair.arrive("/late")
    assert fair.counter("/late") == min(fair.counter("/heavy"), fair.counter("/light"))
