"""Fair share and priorities in the built-in scheduler, stepped by hand (exact step counts, no timing).

A real engine (tiny Llama) without its thread: the test submits requests of two flows and calls
``run_once`` itself. An aggressor fills every row with long requests; a victim's short request must get
its first token within a couple of steps under the fair policy (it preempts the aggressor's newest
request, which later reads its prompt and output again and goes on), and only after the aggressor's
queue under FCFS. Preempted requests must end with exactly the tokens they get unpreempted.
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
SHORT = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)


@dataclass
class Call:
    submitted_at: int
    tokens: list[int] = field(default_factory=list)
    first_at: int | None = None
    reason: str | None = None


class Driver:
    def __init__(self, model_dir: Path, **sched: Any) -> None:
        settings = EngineSettings(max_model_len=128, scheduler=SchedulerSettings(**sched))
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

    def make(model_dir: Path, **sched: Any) -> Driver:
        made.append(Driver(model_dir, **sched))
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
