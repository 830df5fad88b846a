"""Iteration-level (continuous) batching with chunked prefill: one engine thread, one runner step per iteration.

Between two steps the loop takes new requests from a thread-safe inbox, drops cancelled ones, plans
the step within ``max_batched_tokens`` and runs it. The plan, in this order:

1. one token for every running request that has its first token already (decode);
2. the next chunk of every prompt still being read, at most ``long_prefill_tokens`` each;
3. waiting requests in fair-share order (``inference/fairness.py``: interactive before batch, then the flow,
   an API-key tenant and adapter pair, that got the fewest prompt + output tokens, by the virtual
   token counter; ``policy="fcfs"``: oldest first), whose adapter is in a device slot and whose KV
   reservation fits: a short prompt whole, a long one as its first chunk (one long prompt is read at
   a time; the others let shorter requests behind them pass). Batch requests hold at most
   ``batch_share`` of the rows and of the KV cache, so an interactive request always finds room;
4. what is left of the budget goes to the prompts being read, oldest first.

So a long prompt never makes the requests beside or behind it wait for it: they get their first
token in the step they are admitted, while the long prompt is read over several steps. A request's
KV reservation is its prompt + max_tokens (kvcache.py takes blocks as it grows); one that does not
fit waits for running requests to finish, one that can never fit is refused by name. An adapter
not resident yet does not hold up the requests behind it (at most one copy into a slot per step
while others run), so adapters share the batch roughly by arrival.

Nothing a request carries can take others down: admission fails only the request it is admitting;
a step that raises is split in halves and retried until the rows that fail are found, and only
those fail; a row whose logits are NaN or Inf (an adapter with non-finite weights) fails alone.
Every request gets a last output (finished, failed, cancelled or shut down): none is lost.

Priority bound: while interactive requests alone need fewer rows and KV than batch leaves them
(1 - ``batch_share``), an interactive request is admitted in the first step that starts after it
arrives (a step's token budget always has room left after decodes and the one long prompt read at a
time), and a short prompt gets its first token in that step: a batch flood delays it by at most the
step in progress, which a full batch makes slower than a lone request's.

Each request carries the adapter *ID* it resolved to at admission, so a new version of its adapter
never affects it. Results go back through a per-request callback, called on the engine thread
(the HTTP side hands them to its event loop with ``call_soon_threadsafe``).
"""

from __future__ import annotations

import bisect
import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraplane.errors import LoraplaneError, PermanentError, TemporaryError

from ..inference.engines import Output
from ..inference.fairness import DEFAULT, FairShare, Tenant
from ..inference.sampling import SamplingParams
from .metrics import Metrics
from .runner import ModelRunner, SeqStep
from .sampling import TextTail, generator_for, sample
from .tiers import PREFETCH_WINDOW, AdapterTiers

log = logging.getLogger(__name__)


@dataclass
class SchedulerSettings:
    max_num_seqs: int = 32
    """Sequences in one step (the batch size bound), also the most sequences holding KV at once."""
    max_batched_tokens: int = 2048
    """Tokens in one step: prompt chunks + one per decode (at least max_num_seqs)."""
    long_prefill_tokens: int = 0
    """Tokens of one prompt read in a step before other requests get their share; the rest of the
    budget still goes to it. 0: a quarter of max_batched_tokens."""
    max_waiting: int = 256
    """Requests waiting for admission; beyond it submit() raises QueueFull (HTTP 429)."""
    idle_poll_s: float = 0.005
    """Seconds between checks while requests wait only for an adapter to finish loading."""
    policy: str = "fair"
    """Admission order: "fair" (virtual token counter per flow, weights, interactive before batch) or
    "fcfs" (oldest first, tenants and priorities ignored)."""
    batch_share: float = 0.75
    """Fraction of the rows (max_num_seqs) and of the KV cache batch requests may hold (fair policy):
    the rest is kept for interactive requests, which is what bounds their delay."""

    def __post_init__(self) -> None:
        problems = [
            (self.max_num_seqs < 1, "max_num_seqs must be at least 1"),
            (
                self.max_batched_tokens < self.max_num_seqs,
                f"max_batched_tokens ({self.max_batched_tokens}) must be at least max_num_seqs "
                f"({self.max_num_seqs}), so every running sequence decodes in every step",
            ),
            (self.long_prefill_tokens < 0, "long_prefill_tokens must be 0 (automatic) or positive"),
            (self.max_waiting < 1, "max_waiting must be at least 1"),
            (self.policy not in ("fair", "fcfs"), f"policy must be fair or fcfs, not {self.policy!r}"),
            (not 0.0 < self.batch_share <= 1.0, "batch_share must be in (0, 1]"),
        ]
        bad = [msg for wrong, msg in problems if wrong]
        if bad:
            raise PermanentError("InvalidSettings", "; ".join(bad))

    @property
    def prefill_chunk(self) -> int:
        return self.long_prefill_tokens or max(1, self.max_batched_tokens // 4)


@dataclass(eq=False)  # compared by identity: two requests may hold equal fields
class Request:
    """A request as the engine runs it: token IDs, sampling, and the adapter ID it resolved to."""

    request_id: str
    model: str  # the served name it asked for (metrics labels only)
    adapter_id: int | None  # None: the base model
    local_dir: Path | None
    prompt_ids: list[int]
    params: SamplingParams
    max_len: int  # prompt + generated tokens never exceed this
    on_output: Callable[[Output], None]
    arrival: float = field(default_factory=time.monotonic)
    tenant: Tenant = DEFAULT
    # engine-thread state
    seq_id: int = -1
    slot: int = -1
    started: bool = False  # counted as running by the adapter tiers
    computed: int = 0  # prompt tokens in the KV cache
    out_ids: list[int] = field(default_factory=list)
    tail: TextTail | None = None
    generator: torch.Generator | None = None
    first_token_at: float = 0.0
    reserved: int = 0  # KV tokens reserved at admission
    readback: int = 0  # output tokens read again with the prompt after a preemption freed their KV
    parked: bool = False  # preempted with its KV kept: waits holding seq_id and KV, resumes where it stopped
    admitted: bool = False  # ran at least once (a preempted request is not charged or counted again)

    @property
    def reservation(self) -> int:
        """KV tokens it can use: prompt + max_tokens, within its length limit."""
        wanted = self.params.max_tokens if self.params.max_tokens is not None else self.max_len
        return min(len(self.prompt_ids) + wanted, self.max_len)

    @property
    def context(self) -> int:
        """Tokens to read before the next one is sampled: the prompt (and, after a preemption, the output
        so far)."""
        return len(self.prompt_ids) + self.readback

    @property
    def ends_next(self) -> bool:
        """Whether the next token it samples is its last by length (max_tokens or its length limit)."""
        if self.prefilling:
            return False
        n = len(self.out_ids) + 1
        return (self.params.max_tokens is not None and n >= self.params.max_tokens) or (
            len(self.prompt_ids) + n >= self.max_len
        )

    @property
    def prefilling(self) -> bool:
        return self.computed < self.context

    def read(self, n: int) -> list[int]:
        """The next ``n`` tokens to read into the KV cache."""
        if not self.readback:
            return self.prompt_ids[self.computed : self.computed + n]
        return (self.prompt_ids + self.out_ids[: self.readback])[self.computed : self.computed + n]


def _tenant(req: Request) -> Tenant:
    return req.tenant


def _arrival(req: Request) -> float:
    return req.arrival


def _as_error(exc: Exception) -> LoraplaneError:
    if isinstance(exc, LoraplaneError):
        return exc
    return PermanentError("EngineError", f"the engine failed this request: {type(exc).__name__}: {exc}")


class Scheduler:
    """Owns the waiting queue and the running batch; ``run`` is the engine thread's body."""

    def __init__(
        self, runner: ModelRunner, tiers: AdapterTiers, metrics: Metrics, settings: SchedulerSettings
    ) -> None:
        self.runner = runner
        self.tiers = tiers
        self.metrics = metrics
        self.settings = settings
        self.eos = set(runner.config.eos_token_id)
        self._cond = threading.Condition()
        self._inbox: collections.deque[Request | int] = collections.deque()  # requests, or IDs to drop
        self._cancelled: set[str] = set()
        self._queued = 0  # requests submitted and not yet running (the bounded queue)
        self._stopping = False
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self._next_seq = 0
        # adapter ID -> the waiting request its slot is freed for; not admitted meanwhile
        self._draining: dict[int, Request] = {}
        self.steps = 0
        self.beat = time.monotonic()  # when the loop last came round: the engine's liveness
        self.fair = FairShare()
        self.preemptions = 0  # running requests taken back for a flow under its share (fair policy)
        self._fair = settings.policy == "fair"
        self._batch_rows = 0  # batch requests running, and the KV they reserved
        self._batch_kv = 0

    # -- any thread ------------------------------------------------------------------------------

    def submit(self, request: Request) -> None:
        with self._cond:
            if self._queued >= self.settings.max_waiting:
                raise TemporaryError(
                    "QueueFull", f"{self._queued} requests are waiting already; retry shortly", delay=1.0
                )
            self._queued += 1
            self._inbox.append(request)
            self._cond.notify()

    def cancel(self, request_id: str) -> None:
        """The client went away: stop generating for it (its slot and KV row are freed)."""
        with self._cond:
            self._cancelled.add(request_id)
            self._cond.notify()

    def drop_adapter(self, adapter_id: int) -> None:
        """The registry removed this ID: free its copies once the requests already admitted finish."""
        with self._cond:
            self._inbox.append(adapter_id)
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()

    @property
    def queued(self) -> int:
        return self._queued

    # -- engine thread ---------------------------------------------------------------------------

    def run(self) -> None:
        while self.run_once(wait=True):
            pass
        with self._cond:
            inbox, self._inbox = list(self._inbox), collections.deque()
        self._take_inbox(inbox)
        for req in self.running + self.waiting:
            self._finish(req, "error", TemporaryError("ShuttingDown", "the worker is shutting down"))

    def run_once(self, *, wait: bool = False) -> bool:
        """One iteration: take the inbox, plan and run a step. False once stop() was called."""
        self.beat = time.monotonic()
        with self._cond:
            if self._stopping:
                return False
            if wait and not self._inbox and not self._cancelled and not self.running:
                self._cond.wait(self.settings.idle_poll_s if self.waiting else 1.0)
            inbox, self._inbox = list(self._inbox), collections.deque()
            cancelled, self._cancelled = self._cancelled, set()
        try:
            self.iteration(inbox, cancelled)
        except Exception:  # a bug in the bookkeeping itself: fail what runs (with an answer), keep going
            log.exception("engine iteration failed; failing the running requests")
            for req in list(self.running):
                self._finish(req, "error", PermanentError("EngineError", "the engine step failed"))
        return True

    def _take_inbox(self, inbox: list[Request | int]) -> None:
        """Take new requests into the waiting list and apply adapter removals, in arrival order."""
        for item in inbox:
            if isinstance(item, int):
                self.tiers.remove(item)
            else:
                if item.adapter_id is not None:
                    self.tiers.admit(item.adapter_id)
                self.waiting.append(item)
                if self._fair:
                    self.fair.arrive(item.tenant.flow)

    def iteration(self, inbox: list[Request | int], cancelled: set[str]) -> None:
        self._take_inbox(inbox)
        if cancelled:
            for req in [r for r in self.waiting + self.running if r.request_id in cancelled]:
                self._finish(req, "cancelled", None)
        plan = self._plan()
        if not plan:
            return
        self.steps += 1
        self.metrics.batch_size.observe(len(plan))
        self._execute(plan)

    # -- planning --------------------------------------------------------------------------------

    def _plan(self) -> list[tuple[Request, int]]:
        """(request, tokens it adds this step), within the token budget; admits waiting requests."""
        s = self.settings
        chunk = s.prefill_chunk
        plan: dict[Request, int] = {}
        for req in self.running:  # decodes first: they never wait
            if not req.prefilling:
                plan[req] = 1
        budget = s.max_batched_tokens - len(plan)
        reading = [r for r in self.running if r.prefilling]  # prompts being read, oldest first
        for req in reading:
            n = min(req.context - req.computed, chunk, budget)
            if n > 0:
                plan[req] = n
                budget -= n
        long_busy = any(r.context - r.computed > plan.get(r, 0) for r in reading)
        preemptions = self.preemptions
        new = self._admit(budget, chunk, long_busy, plan)
        if self.preemptions != preemptions:  # the preempted leave this step
            running = set(map(id, self.running))
            for req in [r for r in plan if id(r) not in running]:
                budget += plan.pop(req)
            reading = [r for r in reading if id(r) in running]
        for req in new:
            if not req.prefilling:  # a parked request that was decoding resumes with its next token
                plan[req] = 1
                budget -= 1
                continue
            n = min(req.context - req.computed, chunk, budget)
            plan[req] = n
            budget -= n
            reading.append(req)
        for req in reading:  # the leftover budget goes to the prompts being read, oldest first
            if budget <= 0:
                break
            extra = min(req.context - req.computed - plan.get(req, 0), budget)
            if extra > 0:
                plan[req] = plan.get(req, 0) + extra
                budget -= extra
        return list(plan.items())

    def _admit(self, budget: int, chunk: int, long_busy: bool, plan: dict[Request, int]) -> list[Request]:
        """Waiting requests that join this step, in admission order, within the batch, token and KV
        budgets; under the fair policy one may preempt running requests of a flow over its share
        (``_preempt``), which leave ``plan``'s step. A parked request (preempted with its KV kept)
        resumes where it stopped: no allocation, nothing read again."""
        s = self.settings
        kv = self.runner.kv
        copies_left = 1 if self.running else self.runner.max_loras
        new: list[Request] = []
        missing: list[int] = []  # adapter IDs not in a slot, in queue order
        waiting_ids = {id(r) for r in self.waiting}
        for victim, waiter in list(self._draining.items()):
            if id(waiter) not in waiting_ids or victim not in self.tiers.slot_of:
                del self._draining[victim]  # the request it drained for started (or left), or it is gone
        order = self.fair.order(self.waiting, _tenant) if self._fair else list(self.waiting)
        batch_rows = int(s.max_num_seqs * s.batch_share)
        batch_kv = int(kv.total_tokens * s.batch_share)
        preempts = max(1, s.max_num_seqs // 4)  # per step: bounds the churn a burst can cause
        for req in order:
            if budget <= 0:
                break
            todo = req.context - req.computed if req.prefilling else 1  # tokens it needs to go on
            first = min(todo, chunk, budget)
            if first < todo and long_busy:
                continue  # one long prompt is read at a time; shorter requests behind it go first
            reserve = req.reserved if req.parked else min(req.reservation, kv.max_len)
            if not req.parked and (reserve > kv.total_tokens or len(req.prompt_ids) >= reserve):
                self._finish(req, "error", self._too_large(req, reserve))
                continue
            batch = self._fair and req.tenant.batch
            if batch and (self._batch_rows >= batch_rows or self._batch_kv + reserve > batch_kv):
                continue  # the rest is kept for interactive requests
            if not req.parked and not kv.can_allocate(reserve):
                if kv.free_tokens + self._ending_kv() >= reserve:
                    break  # rows ending in this step free enough: wait a step rather than recompute
                while not kv.can_allocate(reserve) and self._drop_parked(req):
                    pass
                while not kv.can_allocate(reserve) and preempts > 0 and self._preempt(req, new, free_kv=True):
                    preempts -= 1
                if not kv.can_allocate(reserve):
                    break  # wait for running requests to free KV, in admission order
            if len(self.running) >= s.max_num_seqs:
                if preempts <= 0 or not self._preempt(req, new):
                    break
                preempts -= 1
            fresh = not req.admitted  # a preempted request is not charged or counted again
            try:  # everything about the request itself that can fail, before any state changes
                if req.tail is None:
                    req.generator = generator_for(req.params, self.runner.device)
                    req.tail = TextTail(self.runner.tokenizer, req.params.stop)
            except Exception as exc:
                self._finish(req, "error", self._refused(exc))
                continue
            if req.adapter_id is not None:
                if req.adapter_id in self._draining:
                    continue  # its slot is being freed for an older request
                resident = req.adapter_id in self.tiers.slot_of
                if not resident and req.adapter_id not in missing:
                    missing.append(req.adapter_id)
                try:
                    slot = self.tiers.ensure(
                        req.adapter_id,
                        req.local_dir,
                        may_copy=copies_left > 0,
                        # only the adapters nearest the queue's head start loading from disk
                        may_load=req.adapter_id in missing[:PREFETCH_WINDOW],
                    )
                except Exception as exc:
                    self._finish(req, "error", _as_error(exc))
                    continue
                if slot is None:
                    self._maybe_drain(req, missing)
                    continue
                if not resident:
                    copies_left -= 1
                req.slot = slot
            self.waiting.remove(req)
            with self._cond:
                self._queued -= 1
            if req.parked:
                req.parked = False
            else:
                req.seq_id = self._next_seq
                self._next_seq += 1
                self.runner.allocate(req.seq_id, reserve)
            if req.adapter_id is not None:
                self.tiers.start(req.adapter_id)
                req.started = True
            req.reserved = reserve
            req.admitted = True
            self.running.append(req)
            if self._fair:
                self.fair.admitted(req.tenant, req.context if fresh else 0)  # the flow paid for it once
                if batch:
                    self._batch_rows += 1
                    self._batch_kv += reserve
            if fresh:
                self.metrics.prompt_tokens.labels(model=req.model).inc(req.context)
                self.metrics.queue_time.labels(model=req.model).observe(time.monotonic() - req.arrival)
            budget -= first
            long_busy = long_busy or first < todo
            new.append(req)
        return new

    def _preempt(self, req: Request, admitted: list[Request], *, free_kv: bool = False) -> bool:
        """Make room for ``req`` (a row, or with ``free_kv`` its KV) by taking back a running request of
        another flow that is over its share: a batch one for an interactive request, else one of a flow
        holding more than its share of the rows whose counter is above ``req``'s; of that flow, the one
        with the fewest tokens in the KV cache (the least work to redo should its KV be dropped; the
        newest of equals), never one ``admitted`` in this step. False when no request qualifies.

        The taken request goes back to waiting with its output so far. For a row it is *parked*: it
        keeps its KV and, when a row is free for its flow again, resumes where it stopped, so no work is
        lost (the KV pool holds the rows' reservations; a parked sequence keeps its own, which
        ``_drop_parked`` takes back when an admission needs it). For KV, or when as many sequences are
        parked as there are rows, its KV is freed and it reads prompt and output again when readmitted
        (recompute, as vLLM preempts).

        This is what bounds a newcomer's wait without holding rows idle: the engine stays full with one
        flow, and a second flow gets its row within a step instead of after a request finishes."""
        if not self._fair:
            return False  # FCFS: oldest first, whatever its tenant
        flow = req.tenant.flow
        held: dict[str, int] = {}
        for r in self.running:
            held[r.tenant.flow] = held.get(r.tenant.flow, 0) + 1
        share = self.settings.max_num_seqs / len(held.keys() | {flow})
        mine, under = self.fair.counter(flow), held.get(flow, 0) < share
        fresh = set(map(id, admitted))
        victim: Request | None = None
        best: tuple[bool, float, int, int] | None = None
        for r in self.running:
            t = r.tenant
            if t.flow == flow or id(r) in fresh or (t.batch, req.tenant.batch) == (False, True):
                continue  # batch never takes from interactive
            if t.batch == req.tenant.batch and not (
                under and held[t.flow] > share and self.fair.counter(t.flow) > mine
            ):
                continue
            rank = (t.batch, self.fair.counter(t.flow), -self.runner.seq_len(r.seq_id), r.seq_id)
            if best is None or rank > best:
                best, victim = rank, r
        if victim is None:
            return False
        self.running.remove(victim)
        if victim.started and victim.adapter_id is not None:
            self.tiers.pause(victim.adapter_id)
            victim.started = False
        if victim.tenant.batch:
            self._batch_rows -= 1
            self._batch_kv -= victim.reserved
        bisect.insort(self.waiting, victim, key=_arrival)
        with self._cond:
            self._queued += 1
        self.fair.requeue(victim.tenant.flow)
        self.preemptions += 1
        parked = sum(r.parked for r in self.waiting)
        if free_kv or (parked >= self.settings.max_num_seqs and not self._drop_parked(None)):
            self._recompute(victim)
            kind = "freed"
        else:
            victim.parked = True
            kind = "kept"
        self.metrics.preemptions.labels(kv=kind).inc()
        log.debug("preempted %s (flow %r, KV %s) for %s (flow %r)", victim.request_id,
                  victim.tenant.flow, kind, req.request_id, flow)  # fmt: skip
        return True

    def _ending_kv(self) -> int:
        """KV tokens the rows whose next token is their last (max_tokens, or the length limit) give back
        after this step."""
        kv = self.runner.kv
        return sum(kv.capacity(r.seq_id) for r in self.running if r.ends_next)

    def _drop_parked(self, req: Request | None) -> bool:
        """Free the KV of the parked request with the fewest tokens in it (it reads them again when it
        resumes), for ``req`` (never an interactive one's for a batch request). False when none qualifies."""
        parked = [
            r
            for r in self.waiting
            if r.parked and not (req is not None and req.tenant.batch and not r.tenant.batch)
        ]
        if not parked:
            return False
        self._recompute(min(parked, key=lambda r: self.runner.seq_len(r.seq_id)))
        return True

    def _recompute(self, req: Request) -> None:
        """Free a waiting request's KV: when readmitted it reads its prompt and output so far again."""
        self.metrics.recomputed_tokens.inc(self.runner.seq_len(req.seq_id))
        self.runner.free(req.seq_id)
        req.seq_id = -1
        req.parked = False
        req.computed = 0
        req.readback = len(req.out_ids)

    def _too_large(self, req: Request, reserve: int) -> LoraplaneError:
        kv = self.runner.kv
        return PermanentError(
            "PromptTooLong",
            f"the prompt ({len(req.prompt_ids)} tokens) plus max_tokens needs {reserve} tokens of KV cache; "
            f"this worker's KV cache holds {kv.total_tokens} tokens and a sequence at most {kv.max_len} "
            "(max_model_len); shorten the prompt or lower max_tokens",
        )

    @staticmethod
    def _refused(exc: Exception) -> LoraplaneError:
        if isinstance(exc, LoraplaneError):
            return exc
        return PermanentError(
            "InvalidSamplingParams", f"the engine cannot take this request's sampling settings: {exc}"
        )

    def _maybe_drain(self, req: Request, missing: list[int]) -> None:
        """A request near the queue's head found every slot busy: stop admitting one resident adapter
        for it, so that slot frees within one request's length. Up to a quarter of the slots drain at
        once, so rarely used adapters are served alongside popular ones instead of after them."""
        assert req.adapter_id is not None
        limit = max(1, self.runner.max_loras // 4)
        if (
            len(self._draining) >= limit
            or req.adapter_id not in missing[:limit]
            or any(w.adapter_id == req.adapter_id for w in self._draining.values())
            or self.tiers.slot_free_or_idle()
        ):
            return
        victim = self.tiers.drain_victim(exclude=set(self._draining))
        if victim is not None:
            self._draining[victim] = req

    # -- running a step ----------------------------------------------------------------------------

    def _execute(self, plan: list[tuple[Request, int]]) -> None:
        """Run the planned rows; when the step raises, run each half on its own, down to the rows that fail."""
        steps = [
            SeqStep(
                r.seq_id,
                r.read(n) if r.prefilling else r.out_ids[-1:],
                r.slot,
            )
            for r, n in plan
        ]
        try:
            logits = self.runner.step(steps)
        except Exception as exc:
            if len(plan) == 1:
                req = plan[0][0]
                log.warning("request %s failed its step: %s", req.request_id, exc)
                self._finish(req, "error", _as_error(exc))
                return
            half = len(plan) // 2
            self._execute(plan[:half])
            self._execute(plan[half:])
            return
        self._collect(plan, logits)

    def _collect(self, plan: list[tuple[Request, int]], logits: torch.Tensor) -> None:
        """Sample one token for each row whose prompt is read; rows with non-finite logits fail alone."""
        finite = torch.isfinite(logits).all(dim=1).tolist()
        ready: list[int] = []
        for i, (req, n) in enumerate(plan):
            if req.prefilling:
                req.computed += n
            if not finite[i]:
                self._finish(req, "error", self._non_finite(req))
            elif not req.prefilling:
                ready.append(i)
        if not ready:
            return
        reqs = [plan[i][0] for i in ready]
        rows = logits.index_select(0, torch.tensor(ready, device=logits.device))
        tokens = sample(rows, [r.params for r in reqs], [r.generator for r in reqs])
        now = time.monotonic()
        for req, token in zip(reqs, tokens, strict=True):
            if token is None:  # its probabilities are not a distribution; the other rows drew once
                self._finish(req, "error", self._non_finite(req))
                continue
            try:
                self._advance(req, token, now)
            except Exception as exc:  # a detokenizer or callback error ends this request only
                self._finish(req, "error", _as_error(exc))

    @staticmethod
    def _non_finite(req: Request) -> LoraplaneError:
        whose = "the base model" if req.adapter_id is None else f"adapter ID {req.adapter_id} ({req.model!r})"
        return PermanentError(
            "NonFiniteOutput",
            f"the logits for this request are NaN or Inf: the weights of {whose} likely hold NaN or Inf "
            "values; other requests are unaffected",
        )

    def _advance(self, req: Request, token: int, now: float) -> None:
        if not req.out_ids:
            req.first_token_at = now
            self.metrics.ttft.labels(model=req.model).observe(now - req.arrival)
        req.out_ids.append(token)
        self.metrics.generation_tokens.labels(model=req.model).inc()
        if self._fair:
            self.fair.generated(req.tenant)
        p = req.params
        reason: str | None = None
        text = ""
        if (token in self.eos and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        else:
            assert req.tail is not None
            text = req.tail.push(token)
            if req.tail.stopped:
                reason = "stop"
            elif (p.max_tokens is not None and len(req.out_ids) >= p.max_tokens) or (
                len(req.prompt_ids) + len(req.out_ids) >= req.max_len
            ):
                reason = "length"
        if reason is None:
            req.on_output(Output(text, [token], None, len(req.prompt_ids), len(req.out_ids)))
            return
        assert req.tail is not None
        text += req.tail.flush()
        n = len(req.out_ids)
        if n > 1:
            self.metrics.tpot.labels(model=req.model).observe((now - req.first_token_at) / (n - 1))
        self._release(req)
        req.on_output(Output(text, [token], reason, len(req.prompt_ids), n))

    def _finish(self, req: Request, reason: str, error: LoraplaneError | None) -> None:
        """End a request early (cancelled, failed, shutdown): its resources first, then its last output."""
        if not self._release(req):
            return  # ended already
        try:
            req.on_output(Output("", [], reason, len(req.prompt_ids), len(req.out_ids), error))
        except Exception:
            log.exception("request %s: its output callback failed", req.request_id)

    def _release(self, req: Request) -> bool:
        """Free what the request holds; False when it held nothing (released before)."""
        if req in self.running:
            self.running.remove(req)
            waiting = False
            if self._fair and req.tenant.batch:
                self._batch_rows -= 1
                self._batch_kv -= req.reserved
        elif req in self.waiting:
            self.waiting.remove(req)
            waiting = True
            with self._cond:
                self._queued -= 1
        else:
            return False
        if self._fair:
            self.fair.left(req.tenant.flow, waiting=waiting)
        self.metrics.e2e.labels(model=req.model).observe(time.monotonic() - req.arrival)
        if req.seq_id >= 0:
            self.runner.free(req.seq_id)
        if req.adapter_id is not None:
            self.tiers.finish(req.adapter_id, started=req.started)
        return True
