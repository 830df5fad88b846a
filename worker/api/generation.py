"""What an OpenAI request means to the engine: resolve ``model`` once, submit, and relay outputs.

The ``model`` name resolves here, once, to the base model or to one adapter *version*; the request
keeps that version's ID until it ends, so a new version swapping in never changes it. Every failure
becomes an ``ApiError`` carrying the HTTP status and the loraplane reason code as the OpenAI
``type``; routes only turn it into JSON.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import weakref
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, generate_latest

from loraplane.errors import LoraplaneError

from ..inference.engines import NON_FINITE_OUTPUT
from .errors import ApiError
from .limits import TENANT_TOKENS, Limiter, Ticket
from .protocol import MAX_CHOICES, ChatCompletionRequest, CompletionRequest, new_id

if TYPE_CHECKING:
    from ..inference.engines import Engine, EngineSlot, Output
    from ..registry import Registry, VersionEntry
    from .auth import Key

access_log = logging.getLogger("loraplane.worker.access")


_WAKE: Any = object()  # put in a Generation's queue to wake its reader


class Generation:
    """One submitted request seen from the event loop: outputs arrive through an asyncio queue.

    A completions request with several prompts is one engine request per prompt; their outputs come
    through this one queue with choice indexes ``prompt * n + choice`` (as vLLM and OpenAI number them).
    """

    def __init__(self, engine: Engine, loop: asyncio.AbstractEventLoop, request_id: str) -> None:
        self.engine = engine
        self.loop = loop
        self.request_id = request_id
        self.engine_ids: list[str] = []  # the engine requests (one per prompt)
        self.adapter_id: int | None = None  # the adapter version it runs on (None: the base model)
        self.queue: asyncio.Queue[Output] = asyncio.Queue()
        self.finished = False
        self.n = 1  # choices per prompt
        self.choices = 1  # choices in all: the request ends when all have a finish_reason
        self._prompts: dict[int, int] = {}  # prompt -> its tokens
        self.on_error: Callable[[LoraplaneError], None] = lambda _: None  # the engine failed it
        self._tokens: dict[int, int] = {}  # choice -> completion tokens
        self._cut: LoraplaneError | None = None
        self.ticket: Ticket | None = None  # what it holds of its adapter's and key's limits
        self.tenant = ""  # its API-key tenant (metrics label)

    @property
    def prompt_tokens(self) -> int:
        return sum(self._prompts.values())

    @property
    def completion_tokens(self) -> int:
        return sum(self._tokens.values())

    def on_output_for(self, prompt: int) -> Callable[[Output], None]:
        """The engine callback (any thread) for one prompt's engine request."""
        offset = prompt * self.n

        def on_output(out: Output) -> None:
            if offset:
                out = dataclasses.replace(out, index=out.index + offset)
            with contextlib.suppress(RuntimeError):  # the loop closed (server shutting down)
                self.loop.call_soon_threadsafe(self.queue.put_nowait, out)

        return on_output

    async def outputs(self) -> AsyncIterator[Output]:
        """Outputs until the last one; raises ApiError if the engine failed the request."""
        done: set[int] = set()
        while not self.finished:
            if self._cut is not None:  # ahead of any outputs still queued
                raise ApiError.of(self._cut)
            if self.queue.empty():
                out = await self.queue.get()
            else:  # get() on a full queue never yields: a flood of outputs would hold the loop
                await asyncio.sleep(0)
                out = self.queue.get_nowait()
            if out is _WAKE:
                continue
            index = out.index
            self._prompts[index // self.n], self._tokens[index] = out.prompt_tokens, out.completion_tokens
            if out.finish_reason is not None:
                done.add(index)
                if out.error is not None:
                    self.cancel()  # the other prompts of a prompt list
                    self.on_error(out.error)
                    raise ApiError.of(out.error)
                self.finished = len(done) >= self.choices
            yield out

    def cut(self, error: LoraplaneError) -> None:
        """On the loop: end this request with ``error`` now, ahead of the outputs it has not sent yet
        (the drain's deadline: a stream says why it ends instead of being cut mid-way)."""
        if not self.finished:
            self._cut = error
            self.queue.put_nowait(_WAKE)

    def cancel(self) -> None:
        """The client left before the end (or one prompt failed, or it was cut): free the engine's
        resources for it."""
        if not self.finished:
            self.finished = True
            for engine_id in self.engine_ids:
                self.engine.cancel(engine_id)


class Serving:
    """Resolves names, checks requests and submits them; shared by the completion and chat routes."""

    def __init__(
        self,
        registry: Registry,
        engine: EngineSlot,
        *,
        retry_after_s: int,
        access_log: bool = True,
        max_logprob_entries: int = 65536,
        max_schema_bytes: int = 16384,
        quarantine: Callable[[int, LoraplaneError], None] | None = None,
    ) -> None:
        self.registry = registry
        self.slot = engine  # empty while the base model loads
        self.retry_after_s = retry_after_s
        self.access_log = access_log
        self.max_logprob_entries = max_logprob_entries
        self.max_schema_bytes = max_schema_bytes
        # Takes an adapter version out of service (Failed) on this worker (the controller's).
        self.quarantine = quarantine or (lambda adapter_id, error: None)
        self.running: weakref.WeakSet[Generation] = weakref.WeakSet()
        self.limiter = Limiter()  # the worker points its book at the watch's limits
        # Counted here, where a request ends, for either engine; rendered with the engine's own series.
        self.metrics = CollectorRegistry()
        self.requests = Counter(
            "loraplane_worker_requests",
            "Finished /v1 generation requests by HTTP status",
            ["model", "status"],
            registry=self.metrics,
        )
        # Tokenizing runs off the event loop (a long prompt takes seconds of CPU; streams and probes
        # keep answering meanwhile), on one thread: fast tokenizers are not safe to share across threads.
        self.tokenizing = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="loraplane-tokenize")

    @property
    def engine(self) -> Engine | None:
        return self.slot.engine

    def render_metrics(self) -> bytes:
        """The request counter and the engine's own series, once an engine serves (Prometheus text)."""
        if self.engine is None:
            return b""
        return generate_latest(self.metrics) + self.engine.metrics.render()

    def require_engine(self) -> Engine:
        if self.engine is None:
            raise ApiError(
                503,
                "EngineLoading",
                "the base model is still loading; retry shortly",
                code="unavailable",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        return self.engine

    def resolve(self, name: str) -> VersionEntry | None:
        """The adapter version ``name`` means now (None: the base model), or an ApiError saying why not."""
        engine = self.require_engine()
        if name == engine.model_name:
            return None
        version = self.registry.lookup(name)
        holders = self.registry.elsewhere.get(name) if version is None else None
        if holders is not None:
            # Placed on other workers (spec.replicas): not loaded here on demand, which would bypass the
            # operator's capacity accounting and fetch it once more; the gateway routes by adapter.
            where = ", ".join(holders) or "no worker yet (see its status.placement)"
            raise ApiError(
                404,
                "AdapterNotPlacedHere",
                f"adapter {name!r} is not placed on this worker; it is held by {where}. Send requests "
                "through the gateway (InferencePool), which routes each adapter to the workers that hold it",
                param="model",
                code="model_not_found",
            )
        if version is None:
            raise ApiError(
                404,
                "ModelNotFound",
                f"the model {name!r} does not exist on this worker; GET /v1/models lists the base model "
                "and the Ready adapters",
                param="model",
                code="model_not_found",
            )
        if version.state == "Failed":
            raise ApiError(
                400,
                version.reason or "AdapterFailed",
                f"adapter {name!r} (ID {version.id}) failed: {version.message or version.reason}",
                param="model",
                code="adapter_failed",
            )
        if version.state != "Ready":
            raise ApiError(
                503,
                "AdapterNotReady",
                f"adapter {name!r} (ID {version.id}) is {version.state}; retry after it is Ready",
                param="model",
                code="model_not_ready",
                headers={"Retry-After": str(self.retry_after_s)},
            )
        return version

    async def submit(
        self,
        request: CompletionRequest | ChatCompletionRequest,
        key: Key | None = None,
        priority: str | None = None,
    ) -> tuple[Generation, str]:
        """Check, tokenize, admit past the limits (``key``: the caller's API key; ``priority``: its
        header) and queue a request; returns its Generation and the response id."""
        engine = self.require_engine()
        for param, message in request.unsupported():
            raise ApiError(400, "UnsupportedParameter", message, param=param, code="unsupported")
        try:
            extras = request.extras()
        except LoraplaneError as exc:
            raise ApiError.of(exc, param="logit_bias") from exc
        lacking = [name for name in extras if name not in engine.features]
        if lacking:
            raise ApiError(
                400,
                "UnsupportedParameter",
                f"the {engine.kind} engine of this worker does not implement {', '.join(lacking)}; "
                "leave them out, or use a worker pool with the vllm engine",
                param=lacking[0],
                code="unsupported",
            )
        if extras.get("tools") == "auto" and getattr(engine, "tool_parser", None) is None:
            raise ApiError(
                400,
                "UnsupportedParameter",
                'tool_choice "auto" needs a tool parser for the model\'s chat format and this worker pool '
                "has none; set the pool's toolCallParser (--tool-call-parser), or force the call with "
                'tool_choice "required" or a named function',
                param="tool_choice",
                code="unsupported",
            )
        vocab = engine.vocab_size
        outside = [t for t in extras.get("logit_bias") or {} if not 0 <= t < vocab]
        if outside:
            raise ApiError(
                400,
                "TokenOutOfRange",
                f"logit_bias names token ID {outside[0]}; token IDs are in [0, {vocab})",
                param="logit_bias",
                code="invalid_value",
            )
        schema = (extras.get("response_format") or {}).get("json_schema")
        if schema is not None:
            size = len(json.dumps(schema, separators=(",", ":")))
            if size > self.max_schema_bytes:
                raise ApiError(
                    400,
                    "SchemaTooLarge",
                    f"response_format.json_schema is {size} bytes of JSON, above this worker's limit of "
                    f"{self.max_schema_bytes} (--max-schema-bytes); send a smaller schema",
                    param="response_format",
                    code="invalid_value",
                )
        version = self.resolve(request.model)
        adapter = None if version is None else version.lora_spec()
        param = "prompt" if isinstance(request, CompletionRequest) else "messages"
        n = extras.get("n", 1)
        if isinstance(request, CompletionRequest) and len(request.prompt_list()) * n > MAX_CHOICES:
            raise ApiError(
                400,
                "TooManyChoices",
                f"{len(request.prompt_list())} prompts x n={n} is above {MAX_CHOICES} choices per request; "
                "send fewer prompts per request",
                param="prompt",
                code="invalid_value",
            )
        limit, _ = engine.limit_for(adapter)
        loop = asyncio.get_running_loop()
        template = None if adapter is None else adapter.chat_template
        try:
            params = request.to_sampling_params()
            prompts = await loop.run_in_executor(
                self.tokenizing, request.prompts, engine.tokenizer, limit, template
            )
        except LoraplaneError as exc:
            raise ApiError.of(exc, param=param if exc.reason == "PromptTooLong" else None) from exc
        if any(not 0 <= t < vocab for ids in prompts for t in ids):
            raise ApiError(
                400,
                "TokenOutOfRange",
                f"prompt token IDs must be in [0, {vocab})",
                param=param,
                code="invalid_value",
            )
        self._check_logprobs(
            extras, params.max_tokens or max(1, limit - min(map(len, prompts))), len(prompts)
        )
        admission = self.limiter.admit(
            adapter=None if version is None else version.adapter,
            adapter_id=None if version is None else version.id,
            model=request.model,
            key=key,
            priority=priority,
            prompt_tokens=sum(map(len, prompts)),
            max_tokens=params.max_tokens,
            asked=bool(request.model_fields_set & {"max_tokens", "max_completion_tokens"}),
            room=limit - min(map(len, prompts)),
            choices=n * len(prompts),
        )
        if admission.max_tokens != params.max_tokens:
            params = dataclasses.replace(params, max_tokens=admission.max_tokens)
        request_id = new_id("cmpl" if isinstance(request, CompletionRequest) else "chatcmpl")
        generation = Generation(engine, loop, request_id)
        generation.n, generation.choices = n, n * len(prompts)
        generation.ticket, generation.tenant = admission.ticket, admission.label
        self.running.add(generation)
        if version is not None:
            generation.adapter_id = adapter_id = version.id

            def on_error(error: LoraplaneError) -> None:
                if error.reason == NON_FINITE_OUTPUT:  # the adapter's weights, not this request
                    self.quarantine(adapter_id, error)

            generation.on_error = on_error
        try:
            for i, prompt_ids in enumerate(prompts):
                engine_id = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                engine.submit(
                    request_id=engine_id,
                    model=request.model,
                    adapter=adapter,
                    prompt_ids=prompt_ids,
                    params=params,
                    extras=extras,
                    on_output=generation.on_output_for(i),
                    tenant=admission.tenant,
                )
                generation.engine_ids.append(engine_id)
        except LoraplaneError as exc:
            generation.cancel()  # the prompts already queued: all or none
            if generation.ticket is not None:
                generation.ticket.done(0)
            raise ApiError.of(exc, param=param if exc.reason == "PromptTooLong" else None) from exc
        return generation, request_id

    def cut_all(self, error: LoraplaneError) -> int:
        """End every running request with ``error`` now; returns how many."""
        running = [g for g in self.running if not g.finished]
        for g in running:
            g.cut(error)
        return len(running)

    def _check_logprobs(self, extras: dict[str, Any], max_tokens: int, prompts: int = 1) -> None:
        logprobs = extras.get("logprobs")
        if logprobs is None:
            return
        n = extras.get("n", 1)
        entries = prompts * n * (logprobs + 1) * max_tokens
        if entries > self.max_logprob_entries:
            per = f"{prompts} prompts x " if prompts > 1 else ""
            raise ApiError(
                400,
                "TooManyLogprobs",
                f"{per}n ({n}) x (logprobs ({logprobs}) + 1) x max_tokens ({max_tokens}) is {entries} log "
                f"probabilities, above this worker's limit of {self.max_logprob_entries} "
                "(--max-logprob-entries); lower n, logprobs or max_tokens",
                param="logprobs",
                code="invalid_value",
            )

    def finished(
        self, path: str, model: str, status: int | str, generation: Generation | None, seconds: float
    ) -> None:
        """A /v1 generation request ended: count it, give back what it held of its limits, and write its
        access log line (unless turned off)."""
        if generation is not None:
            used = generation.prompt_tokens + generation.completion_tokens
            TENANT_TOKENS.labels(tenant=generation.tenant).inc(used)
            if generation.ticket is not None:
                generation.ticket.done(used)
        if self.engine is not None:
            self.requests.labels(model=model, status=str(status)).inc()
        if not self.access_log:
            return
        fields: dict[str, Any] = {
            "path": path,
            "model": model,
            "adapter_id": generation.adapter_id if generation else None,
            "status": int(status),
            "prompt_tokens": generation.prompt_tokens if generation else 0,
            "completion_tokens": generation.completion_tokens if generation else 0,
            "latency_s": round(seconds, 4),
            "request_id": generation.request_id if generation else None,
        }
        access_log.info(" ".join(f"{k}={v}" for k, v in fields.items() if v is not None), extra=fields)


def model_label(serving: Serving, name: Any) -> str:
    """The metrics label for a request's model: unknown names collapse, so labels stay bounded."""
    engine = serving.engine
    if isinstance(name, str) and (
        (engine is not None and name == engine.model_name) or serving.registry.lookup(name) is not None
    ):
        return name
    return "unknown"
