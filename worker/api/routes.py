"""Thin aiohttp routes of the OpenAI API: parse, hand to ``Serving``, write JSON or SSE.

``add_openai(app, engine, registry)`` adds them to the server ``server.build_app`` made (which owns
auth, probes and the drain). The middleware turns every ``ApiError`` (and aiohttp's own HTTP errors:
404 route, 405, 413 body too large) into ``{"error": {message, type, param, code}}`` and counts each
/v1 generation request by model and final status (499: the client went away). The body is parsed
defensively: no NaN/Infinity, no lone surrogates, no nesting that would recurse, a read deadline.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from . import responses, tools
from .errors import ApiError
from .generation import Generation, Serving, model_label
from .limits import PRIORITY_HEADER, priority_of
from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Delta,
    LoraplaneModelInfo,
    ModelCard,
    ModelList,
    Usage,
)
from .webapp import API_KEY, GENERATION_PATHS, HEALTH, SETTINGS

if TYPE_CHECKING:
    from loraplane.errors import LoraplaneError

    from ..inference.engines import EngineSlot, Output
    from .auth import Key

log = logging.getLogger(__name__)

SERVING = web.AppKey("serving", Serving)
_M = TypeVar("_M", bound=BaseModel)
MAX_JSON_DEPTH = 32
"""Deepest nesting a request body may have (OpenAI's requests need 5)."""
# Per request (the middleware and its handler share one task): the model label, final status and
# the Generation (for the access log).
_STATE: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("loraplane_request")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def json_response(
    body: BaseModel, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        text=body.model_dump_json(by_alias=True),
        status=status,
        headers=headers,
        content_type="application/json",
    )


def _error_response(err: ApiError) -> web.Response:
    return json_response(err.body(), status=err.status, headers=err.headers)


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    status: int | str = 500
    started = time.monotonic()
    state: dict[str, Any] = {"model": "unknown"}
    _STATE.set(state)
    try:
        response = await handler(request)
        status = state.get("outcome", response.status)
        return response
    except ApiError as err:
        status = err.status
        return _error_response(err)
    except web.HTTPException as exc:
        status = exc.status
        reason = {404: "NotFound", 405: "MethodNotAllowed", 413: "RequestTooLarge"}.get(
            exc.status, "HttpError"
        )
        return _error_response(ApiError(exc.status, reason, exc.text or exc.reason, code=reason))
    except asyncio.CancelledError:
        status = 499
        raise
    except Exception:
        log.exception("request %s %s failed", request.method, request.path)
        return _error_response(ApiError(500, "InternalError", "internal error; see the worker's log"))
    finally:
        if request.path in GENERATION_PATHS and request.method == "POST":
            request.app[SERVING].finished(
                request.path, str(state["model"]), status, state.get("generation"), time.monotonic() - started
            )


async def _parse(request: web.Request, model: type[_M]) -> _M:
    settings = request.app[SETTINGS]
    try:
        async with asyncio.timeout(settings.client_timeout_seconds):
            raw = await request.read()
    except TimeoutError as exc:
        raise ApiError(
            408,
            "RequestTimeout",
            f"the request body did not arrive within {settings.client_timeout_seconds:g} s",
            code="request_timeout",
            headers={"Connection": "close"},
        ) from exc
    except web.HTTPRequestEntityTooLarge as exc:
        raise ApiError(
            413,
            "RequestTooLarge",
            f"the request body is above {settings.max_body_bytes} bytes; shorten the prompt",
            code="request_too_large",
        ) from exc
    data = _loads(raw)
    if isinstance(data, dict):
        _STATE.get()["model"] = model_label(request.app[SERVING], data.get("model"))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        param = str(first["loc"][0]) if first["loc"] else None
        if first["type"] == "extra_forbidden":
            raise ApiError(
                400,
                "UnknownParameter",
                f"unknown parameter {where!r}: this worker does not implement it; remove it",
                param=param,
                code="unsupported",
            ) from exc
        raise ApiError(
            400, "InvalidRequest", f"{where}: {first['msg']}", param=param, code="invalid_value"
        ) from exc


def _caller(request: web.Request) -> tuple[Key | None, str | None]:
    """The API key the gate matched (None without keys) and the request's priority header."""
    return request.get(API_KEY), priority_of(request.headers.get(PRIORITY_HEADER))


def _invalid_json(message: str) -> ApiError:
    return ApiError(400, "InvalidJson", f"the body is not valid JSON: {message}", code="invalid_json")


def _no_constant(name: str) -> Any:
    raise _invalid_json(f"{name} is not a JSON number")


def _loads(raw: bytes) -> Any:
    """Strict JSON (RFC 8259): no NaN/Infinity, UTF-8 only, no lone surrogates, bounded nesting."""
    try:
        data = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _invalid_json(str(exc)) from exc
    except RecursionError as exc:
        raise _invalid_json(f"nested deeper than {MAX_JSON_DEPTH} levels") from exc
    _check_tree(data, "", 0)
    return data


def _check_tree(value: Any, where: str, depth: int) -> None:
    if depth > MAX_JSON_DEPTH:
        raise _invalid_json(f"nested deeper than {MAX_JSON_DEPTH} levels")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise _invalid_json(
                f"{where or 'a string'} holds an unpaired UTF-16 surrogate ({value[exc.start]!a}); "
                "send text as valid UTF-8"
            ) from exc
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_tree(k, where, depth + 1)
            _check_tree(v, f"{where}.{k}" if where else str(k), depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_tree(v, f"{where}.{i}", depth + 1)


def _sse(body: BaseModel) -> bytes:
    data = b"data: " + body.model_dump_json(by_alias=True).encode() + b"\n\n"
    if isinstance(body, responses.Event):  # the Responses API names each event (as OpenAI does)
        return f"event: {body.type}\n".encode() + data
    return data


Chunks = Callable[["Output | None"], "BaseModel | list[BaseModel] | None"]


async def _stream(
    request: web.Request, generation: Generation, chunks: Chunks, *, done: bool = True
) -> web.StreamResponse:
    """Write each output as SSE events (``chunks`` builds them, or None to skip; ``chunks(None)``: the
    closing ones, e.g. usage), then [DONE] (unless ``done`` is False: the Responses API sends none).

    A client that stops reading holds the stream at most ``client_timeout_seconds`` per chunk: then the
    connection is closed and its request cancelled, so it cannot hold a batch row or a drain."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    timeout = request.app[SETTINGS].client_timeout_seconds

    async def write(data: bytes) -> None:
        async with asyncio.timeout(timeout):
            await response.write(data)

    try:
        try:
            async for out in generation.outputs():
                for chunk in _listed(chunks(out)):
                    await write(_sse(chunk))
        except ApiError as err:
            _STATE.get()["outcome"] = err.status
            await write(_sse(err.body()))
        for chunk in _listed(chunks(None)):
            await write(_sse(chunk))
        if done:
            await write(b"data: [DONE]\n\n")
        await response.write_eof()
    except asyncio.CancelledError:
        _STATE.get()["outcome"] = 499
        raise
    except ConnectionResetError:  # the client went away mid-stream
        _STATE.get()["outcome"] = 499
    except TimeoutError:
        log.warning("stream %s: the client took no data for %g s; closing it", generation.request_id, timeout)
        _STATE.get()["outcome"] = 408
        if request.transport is not None:
            request.transport.abort()
    finally:
        generation.cancel()
    return response


def _listed(chunks: BaseModel | list[BaseModel] | None) -> list[BaseModel]:
    return [] if chunks is None else chunks if isinstance(chunks, list) else [chunks]


@dataclass
class _Choice:
    text: str = ""
    finish_reason: str = "stop"
    logprobs: list[Any] | None = None


async def _collect(generation: Generation) -> list[_Choice]:
    """The whole output, one entry per choice (index order)."""
    choices = [_Choice() for _ in range(generation.choices)]
    try:
        async for out in generation.outputs():
            c = choices[out.index]
            c.text += out.text
            c.finish_reason = out.finish_reason or c.finish_reason
            entries = getattr(out, "logprobs", None)
            if entries is not None:
                c.logprobs = (c.logprobs or []) + entries
    finally:
        generation.cancel()
    return choices


def _completion_logprobs(entries: list[Any] | None, offset: int = 0) -> CompletionLogprobs | None:
    if entries is None:
        return None
    lp = CompletionLogprobs()
    lp.add(entries, offset)
    return lp


def _chat_logprobs(entries: list[Any] | None) -> ChatLogprobs | None:
    if entries is None:
        return None
    lp = ChatLogprobs()
    lp.add(entries)
    return lp


async def completions(request: web.Request) -> web.StreamResponse:
    serving = request.app[SERVING]
    body = await _parse(request, CompletionRequest)
    generation, rid = await serving.submit(body, *_caller(request))
    _STATE.get()["generation"] = generation
    if body.stream:
        offsets: dict[int, int] = {}  # choice -> characters streamed so far (logprobs text_offset)

        def chunk(out: Output | None) -> BaseModel | None:
            if out is None:
                if not body.include_usage:
                    return None
                usage = Usage.of(generation.prompt_tokens, generation.completion_tokens)
                return CompletionResponse(id=rid, model=body.model, choices=[], usage=usage)
            if not out.text and out.finish_reason is None:
                return None
            index = out.index
            logprobs = _completion_logprobs(getattr(out, "logprobs", None), offsets.get(index, 0))
            offsets[index] = offsets.get(index, 0) + len(out.text)
            choice = CompletionChoice(
                index=index, text=out.text, finish_reason=out.finish_reason, logprobs=logprobs
            )
            return CompletionResponse(id=rid, model=body.model, choices=[choice])

        return await _stream(request, generation, chunk)
    collected = await _collect(generation)
    usage = Usage.of(generation.prompt_tokens, generation.completion_tokens)
    choices = [
        CompletionChoice(
            index=i, text=c.text, finish_reason=c.finish_reason, logprobs=_completion_logprobs(c.logprobs)
        )
        for i, c in enumerate(collected)
    ]
    return json_response(CompletionResponse(id=rid, model=body.model, choices=choices, usage=usage))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    serving = request.app[SERVING]
    body = await _parse(request, ChatCompletionRequest)
    generation, rid = await serving.submit(body, *_caller(request))
    _STATE.get()["generation"] = generation
    calls = tools.Calls.of(body, serving.require_engine())
    if body.stream:
        started: set[int] = set()  # choices whose first chunk (with the role) went out

        def chunk(out: Output | None) -> BaseModel | None:
            if out is None:
                if not body.include_usage:
                    return None
                usage = Usage.of(generation.prompt_tokens, generation.completion_tokens)
                return ChatCompletionChunk(id=rid, model=body.model, choices=[], usage=usage)
            index = out.index
            first = index not in started
            delta = calls.delta(index, out)
            finish = calls.finish_reason(index, out.finish_reason)
            if delta is None and finish is None and not first:
                return None
            started.add(index)
            delta = delta or Delta()
            delta.role = "assistant" if first else None
            choice = ChatChunkChoice(
                index=index,
                delta=delta,
                finish_reason=finish,
                logprobs=_chat_logprobs(getattr(out, "logprobs", None)),
            )
            return ChatCompletionChunk(id=rid, model=body.model, choices=[choice])

        return await _stream(request, generation, chunk)
    collected = await _collect(generation)
    usage = Usage.of(generation.prompt_tokens, generation.completion_tokens)
    choices = []
    for i, c in enumerate(collected):
        content, found = calls.whole(i, c.text)
        choices.append(
            ChatChoice(
                index=i,
                message=AssistantMessage(content=content, tool_calls=found),
                finish_reason=calls.finish_reason(i, c.finish_reason),
                logprobs=_chat_logprobs(c.logprobs),
            )
        )
    return json_response(ChatCompletionResponse(id=rid, model=body.model, choices=choices, usage=usage))


async def create_response(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``: text generation, run as the chat request it amounts to."""
    serving = request.app[SERVING]
    body = await _parse(request, responses.ResponsesRequest)
    for param, message in body.unsupported():
        raise ApiError(400, "UnsupportedParameter", message, param=param, code="unsupported")
    generation, _ = await serving.submit(body.to_chat(), *_caller(request))
    _STATE.get()["generation"] = generation
    response_id, message_id = responses.new_ids()
    if body.stream:
        events = responses.Events(body, response_id, message_id)
        last: list[str | None] = []  # the finish reason, once seen

        def chunk(out: Output | None) -> list[BaseModel] | None:
            if out is None:
                if "outcome" in _STATE.get():  # failed: the error event was the last one
                    return None
                return [*events.end(last[0] if last else None, _response_usage(generation))]
            sent: list[BaseModel] = [] if events.seq else [*events.start()]
            if out.text:
                sent.append(events.delta(out.text))
            if out.finish_reason is not None:
                last.append(out.finish_reason)
            return sent

        return await _stream(request, generation, chunk, done=False)
    (c,) = await _collect(generation)
    status = responses.status_of(c.finish_reason)
    text = responses.OutputText(text=c.text)
    output = responses.OutputMessage(id=message_id, status=status, content=[text])  # type: ignore[arg-type]
    response = responses.Response.of(body, response_id, status, [output])
    response.usage = _response_usage(generation)
    return json_response(response)


def _response_usage(generation: Generation) -> responses.ResponseUsage:
    p, c = generation.prompt_tokens, generation.completion_tokens
    return responses.ResponseUsage(input_tokens=p, output_tokens=c, total_tokens=p + c)


def _cards(serving: Serving, name: str | None = None) -> list[ModelCard]:
    """The model cards of the base model and the Ready adapters; ``name``: only that one (resolved
    as a request's ``model`` is, so an unknown, failed or loading adapter gets the same error)."""
    engine = serving.require_engine()
    base = engine.model_name
    versions = [None, *serving.registry.ready()] if name is None else [serving.resolve(name)]
    cards = []
    for v in versions:
        if v is None:
            cards.append(
                ModelCard(id=base, root=base, loraplane=LoraplaneModelInfo(id=None, served_model=base))
            )
        else:
            info = LoraplaneModelInfo(id=v.id, served_model=base, adapter=v.adapter)
            cards.append(ModelCard(id=v.served_name, root=base, parent=base, loraplane=info))
    return cards


async def models(request: web.Request) -> web.StreamResponse:
    return json_response(ModelList(data=_cards(request.app[SERVING])))


async def model(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models/{model}`` (the openai client's ``models.retrieve``): one card, or the error a
    request for that model would get."""
    return json_response(_cards(request.app[SERVING], request.match_info["model"])[0])


async def engine_state(request: web.Request) -> web.StreamResponse:
    """Which engine serves, and the adapter IDs it holds as the engine itself reports them, next to the
    IDs this worker serves as Ready: the two sets loraplane keeps equal (tests and operators compare)."""
    serving = request.app[SERVING]
    engine = serving.require_engine()
    ready_before = {v.id for v in serving.registry.ready()}
    held = await engine.adapter_ids()
    ready_after = {v.id for v in serving.registry.ready()}
    draining: set[int] = getattr(engine, "draining", set)()
    pending = {v.id for v in serving.registry.snapshot() if v.state not in ("Ready", "Failed")}
    return web.json_response(
        {
            "kind": engine.kind,
            "adapterIds": sorted(held),
            "readyIds": sorted(ready_after),
            "readyIdsBefore": sorted(ready_before),
            "drainingIds": sorted(draining),
            "pendingIds": sorted(pending),
        }
    )


def add_openai(
    app: web.Application,
    engine: EngineSlot,
    registry: Any,
    quarantine: Callable[[int, LoraplaneError], None] | None = None,
) -> None:
    """The OpenAI routes, their error middleware, and what they tell the probes and /metrics."""
    settings = app[SETTINGS]
    serving = Serving(
        registry,
        engine,
        retry_after_s=settings.retry_after_s,
        access_log=settings.access_log,
        max_logprob_entries=settings.max_logprob_entries,
        max_schema_bytes=settings.max_schema_bytes,
        quarantine=quarantine,
    )
    app[SERVING] = serving
    app.middlewares.append(middleware)

    async def close(_: web.Application) -> None:
        serving.tokenizing.shutdown(wait=False, cancel_futures=True)

    app.on_cleanup.append(close)
    health = app[HEALTH]
    health.ready.append(lambda: None if serving.engine is not None else "the base model is still loading")
    health.live.append(
        lambda: serving.engine.problem(settings.engine_stall_seconds) if serving.engine else None
    )
    health.metrics.append(serving.render_metrics)
    health.cut.append(serving.cut_all)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model:.+}", model)  # served names may hold "/" (org/name)
    app.router.add_get("/engine", engine_state)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/responses", create_response)
