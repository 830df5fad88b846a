"""Fair share of a saturated engine: the virtual token counter (VTC) of Sheng et al., "Fairness in
Serving Large Language Models" (OSDI 2024), with weights and two priority classes.

A *flow* is what shares the engine: one (API-key tenant, adapter) pair, so adapters share a worker
fairly, and so do the tenants of one adapter. Each flow with work has a counter of the service it got:
its requests' prompt tokens when they are admitted and every output token as it is generated, divided
by the flow's weight. Admission takes the oldest waiting request of the flow with the smallest counter;
interactive requests all go before batch ones (the engine also keeps rows for interactive work, see
its ``batch_share``). A flow that starts waiting again is lifted to the smallest counter of the flows
waiting (or to the last admitted flow's counter when none waits), so it gets no credit for the time it
was idle: a flow alone gets everything (work-conserving), a newcomer cannot starve the others, and the
VTC bound holds: two backlogged flows' counters differ by at most about one request's cost
(prompt + max_tokens) over the weight. Counters of flows with nothing waiting or running are dropped,
so the state is O(active flows), whatever the number of adapters.

Used from one thread (the built-in engine's thread, or vLLM's event loop): no lock.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

R = TypeVar("R")


@dataclass(frozen=True)
class Tenant:
    """Who a request is for, as fair share sees it."""

    flow: str
    """The flow: ``tenant/served name`` (tenant empty without an API-key tenant)."""
    weight: float = 1.0
    """Its share relative to other flows (the key's weight times the adapter's)."""
    batch: bool = False
    """Batch priority: runs on what interactive requests leave."""


DEFAULT = Tenant("")


class FairShare:
    """Virtual token counters of the active flows."""

    def __init__(self) -> None:
        self._counter: dict[str, float] = {}
        self._waiting: dict[str, int] = {}  # flow -> requests waiting for admission
        self._active: dict[str, int] = {}  # flow -> requests waiting or running
        self._floor = 0.0  # the last admitted flow's counter: where a flow starts when none waits

    def arrive(self, flow: str) -> None:
        """A request of ``flow`` starts waiting."""
        if not self._waiting.get(flow):
            waiting = [self._counter[f] for f in self._waiting]
            floor = min(waiting) if waiting else self._floor
            self._counter[flow] = max(self._counter.get(flow, floor), floor)
        self._waiting[flow] = self._waiting.get(flow, 0) + 1
        self._active[flow] = self._active.get(flow, 0) + 1

    def requeue(self, flow: str) -> None:
        """A running request of ``flow`` was preempted: it waits again (it stays active)."""
        self._waiting[flow] = self._waiting.get(flow, 0) + 1

    def preemptible(
        self, tenant: Tenant, running: Sequence[R], tenant_of: Callable[[R], Tenant], rows: int
    ) -> list[R]:
        """The running requests a waiting request of ``tenant`` may take a row back from, best first:
        batch ones for an interactive request; else those of a flow holding more than its share of
        the ``rows`` (rows over the flows running and ``tenant``'s), while ``tenant``'s flow holds less
        and has a counter no higher (a flow coming back starts at the counter of the flows waiting, so
        equal counters are the newcomer's case). Ranked batch first, then the highest counter, then the
        least work lost: ``running`` is ordered so that its last request loses the least (oldest first
        where that is the newest; by context length where a preempted request is read again whole).
        Batch never takes from interactive."""
        held: dict[str, int] = {}
        for r in running:
            flow = tenant_of(r).flow
            held[flow] = held.get(flow, 0) + 1
        share = rows / len(held.keys() | {tenant.flow})
        mine, under = self.counter(tenant.flow), held.get(tenant.flow, 0) < share
        ranked: list[tuple[tuple[bool, float, int], R]] = []
        for i, r in enumerate(running):
            t = tenant_of(r)
            if t.flow == tenant.flow or (t.batch, tenant.batch) == (False, True):
                continue
            if t.batch == tenant.batch and not (
                under and held[t.flow] > share and self.counter(t.flow) >= mine
            ):
                continue
            ranked.append(((t.batch, self.counter(t.flow), i), r))
        ranked.sort(key=lambda x: x[0], reverse=True)
        return [r for _, r in ranked]

    def admitted(self, tenant: Tenant, prompt_tokens: int) -> None:
        """A waiting request of the flow joins the running batch: charge its prompt."""
        flow = tenant.flow
        self._unwait(flow)
        self._counter[flow] = self._counter.get(flow, self._floor) + prompt_tokens / tenant.weight
        self._floor = self._counter[flow]

    def generated(self, tenant: Tenant, tokens: int = 1) -> None:
        """A running request of the flow produced ``tokens`` output tokens."""
        if tenant.flow in self._counter:
            self._counter[tenant.flow] += tokens / tenant.weight

    def left(self, flow: str, *, waiting: bool) -> None:
        """A request ended (``waiting``: before it was admitted); an idle flow's counter is dropped."""
        if waiting:
            self._unwait(flow)
        left = self._active.get(flow, 1) - 1
        if left > 0:
            self._active[flow] = left
        else:
            self._active.pop(flow, None)
            self._counter.pop(flow, None)

    def _unwait(self, flow: str) -> None:
        n = self._waiting.get(flow, 1) - 1
        if n > 0:
            self._waiting[flow] = n
        else:
            self._waiting.pop(flow, None)

    def counter(self, flow: str) -> float:
        return self._counter.get(flow, self._floor)

    @property
    def flows(self) -> int:
        """Flows with requests waiting or running (the size of the state)."""
        return len(self._active)

    def order(self, waiting: Iterable[R], tenant_of: Callable[[R], Tenant]) -> Iterator[R]:
        """``waiting`` (oldest first) in admission order: interactive before batch, then the flow with the
        smallest counter, oldest first within a flow. Lazy: a request the caller admits (``admitted``)
        raises its flow's counter before the next one is picked, so one step's admissions interleave
        flows as VTC does one request at a time."""
        groups: dict[tuple[bool, str], deque[R]] = {}
        for r in waiting:
            t = tenant_of(r)
            groups.setdefault((t.batch, t.flow), deque()).append(r)
        if len(groups) == 1:
            yield from next(iter(groups.values()))
            return
        heap = [(batch, self.counter(flow), i, flow) for i, (batch, flow) in enumerate(groups)]
        heapq.heapify(heap)
        seq = len(heap)
        while heap:
            batch, _, _, flow = heapq.heappop(heap)
            group = groups[(batch, flow)]
            yield group.popleft()
            if group:
                seq += 1
                heapq.heappush(heap, (batch, self.counter(flow), seq, flow))
