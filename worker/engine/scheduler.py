"""Iteration-level (continuous) batching: one engine thread, one runner step per iteration.

Between two steps the loop takes new requests from a thread-safe inbox, drops cancelled ones,
admits waiting requests whose adapter is in a device slot (copying at most one adapter into a slot
per step while others run), then runs one mixed step: the prompts of newly admitted requests
(prefill) and one token for each running request (decode). Finished sequences leave at once and
free their KV row. Waiting requests are taken oldest first; one whose adapter is not resident yet
does not hold up the requests behind it, so adapters share the batch roughly by arrival.

Each request carries the adapter *ID* it resolved to at admission, so a new version of its adapter
never affects it. Results go back through a per-request callback, called on the engine thread
(the HTTP side hands them to its event loop with ``call_soon_threadsafe``).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loraplane.crds.errors import LoraplaneError, PermanentError, TemporaryError

from .metrics import Metrics
from .runner import ModelRunner, SeqStep
from .sampling import SamplingParams, TextTail, sample
from .tiers import PREFETCH_WINDOW, AdapterTiers

log = logging.getLogger(__name__)


@dataclass
class SchedulerSettings:
    max_num_seqs: int = 32
    """Sequences in one step (the batch size bound); also the KV cache's rows."""
    max_batched_tokens: int = 2048
    """Tokens in one step (prefill prompts + one per decode); a longer prompt runs alone."""
    max_waiting: int = 256
    """Requests waiting for admission; beyond it submit() raises QueueFull (HTTP 429)."""
    idle_poll_s: float = 0.005
    """Seconds between checks while requests wait only for an adapter to finish loading."""


@dataclass
class Output:
    """What one step produced for one request (``finish_reason`` set on its last output)."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: LoraplaneError | None = None


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
    # engine-thread state
    seq_id: int = -1
    slot: int = -1
    out_ids: list[int] = field(default_factory=list)
    tail: TextTail | None = None
    generator: torch.Generator | None = None
    first_token_at: float = 0.0


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
        while True:
            with self._cond:
                if self._stopping:
                    break
                if not self._inbox and not self._cancelled and not self.running:
                    self._cond.wait(self.settings.idle_poll_s if self.waiting else 1.0)
                inbox, self._inbox = list(self._inbox), collections.deque()
                cancelled, self._cancelled = self._cancelled, set()
            try:
                self.iteration(inbox, cancelled)
            except Exception:  # never let one bad step kill the engine thread
                log.exception("engine step failed; failing the running requests")
                for req in list(self.running):
                    self._finish(req, "error", PermanentError("EngineError", "the engine step failed"))
        with self._cond:
            inbox, self._inbox = list(self._inbox), collections.deque()
        self._take_inbox(inbox)
        for req in self.running + self.waiting:
            self._finish(req, "error", TemporaryError("ShuttingDown", "the worker is shutting down"))

    def _take_inbox(self, inbox: list[Request | int]) -> None:
        """Take new requests into the waiting list and apply adapter removals, in arrival order."""
        for item in inbox:
            if isinstance(item, int):
                self.tiers.remove(item)
            else:
                if item.adapter_id is not None:
                    self.tiers.admit(item.adapter_id)
                self.waiting.append(item)

    def iteration(self, inbox: list[Request | int], cancelled: set[str]) -> None:
        self._take_inbox(inbox)
        if cancelled:
            for req in [r for r in self.waiting + self.running if r.request_id in cancelled]:
                self._finish(req, "cancelled", None)
        new = self._admit()
        batch = self.running + new
        if not batch:
            return
        steps = [SeqStep(r.seq_id, r.prompt_ids if not r.out_ids else r.out_ids[-1:], r.slot) for r in batch]
        self.running = list(batch)  # _advance removes finished ones from it while we walk batch
        logits = self.runner.step(steps)
        tokens = sample(logits, [r.params for r in batch], [r.generator for r in batch])
        self.steps += 1
        self.metrics.batch_size.observe(len(batch))
        now = time.monotonic()
        for req, token in zip(batch, tokens, strict=True):
            self._advance(req, token, now)

    def _admit(self) -> list[Request]:
        """Waiting requests that join this step, oldest first, within the batch and token budgets."""
        s = self.settings
        budget = s.max_batched_tokens - len(self.running)
        copies_left = 1 if self.running else self.runner.max_loras
        new: list[Request] = []
        missing: list[int] = []  # adapter IDs not in a slot, in queue order
        waiting_ids = {id(r) for r in self.waiting}
        for victim, waiter in list(self._draining.items()):
            if id(waiter) not in waiting_ids or victim not in self.tiers.slot_of:
                del self._draining[victim]  # the request it drained for started (or left), or it is gone
        for req in list(self.waiting):
            if len(self.running) + len(new) >= s.max_num_seqs:
                break
            n = len(req.prompt_ids)
            if n > budget and (new or self.running):
                break  # keep arrival order for long prompts: it goes first next step
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
                except LoraplaneError as exc:
                    self._finish(req, "error", exc)
                    continue
                if slot is None:
                    self._maybe_drain(req, missing)
                    continue
                if not resident:
                    copies_left -= 1
                req.slot = slot
                self.tiers.start(req.adapter_id)
            self.waiting.remove(req)
            with self._cond:
                self._queued -= 1
            req.seq_id = self._next_seq
            self._next_seq += 1
            self.runner.allocate(req.seq_id)
            req.tail = TextTail(self.runner.tokenizer, req.params.stop)
            req.generator = req.params.generator(self.runner.device)
            self.metrics.prompt_tokens.labels(model=req.model).inc(n)
            self.metrics.queue_time.labels(model=req.model).observe(time.monotonic() - req.arrival)
            budget -= n
            new.append(req)
        return new

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

    def _advance(self, req: Request, token: int, now: float) -> None:
        if not req.out_ids:
            req.first_token_at = now
            self.metrics.ttft.labels(model=req.model).observe(now - req.arrival)
        req.out_ids.append(token)
        self.metrics.generation_tokens.labels(model=req.model).inc()
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
        req.on_output(Output(text, [token], reason, len(req.prompt_ids), n))
        self._release(req)

    def _finish(self, req: Request, reason: str, error: LoraplaneError | None) -> None:
        """End a request early (cancelled, failed, shutdown)."""
        req.on_output(Output("", [], reason, len(req.prompt_ids), len(req.out_ids), error))
        self._release(req)

    def _release(self, req: Request) -> None:
        started = req.seq_id >= 0
        self.metrics.e2e.labels(model=req.model).observe(time.monotonic() - req.arrival)
        if req in self.running:
            self.running.remove(req)
        if req in self.waiting:
            self.waiting.remove(req)
            with self._cond:
                self._queued -= 1
        if started:
            self.runner.free(req.seq_id)
        if req.adapter_id is not None:
            self.tiers.finish(req.adapter_id, started=started)
