"""Thin aiohttp routes: parse, hand to ``Serving``, write JSON or SSE; errors in OpenAI's shape.

The middleware turns every ``ApiError`` (and aiohttp's own HTTP errors: 404 route, 405, 413 body
too large) into ``{"error": {message, type, param, code}}``, checks the optional bearer token, and
counts each /v1 generation request by model and final status (499: the client went away).
"""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from pydantic import BaseModel, ValidationError

from .protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Delta,
    LoraplaneModelInfo,
    ModelCard,
    ModelList,
    Usage,
)
from .serving import ApiError, Generation, Serving, model_label

log = logging.getLogger(__name__)

SERVING = web.AppKey("serving", Serving)
API_KEY = web.AppKey("api_key", str)
MAX_BODY = web.AppKey("max_body_bytes", int)
_M = TypeVar("_M", bound=BaseModel)
_GENERATION_PATHS = {"/v1/completions", "/v1/chat/completions"}
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
        key = request.app[API_KEY]
        if key and request.path.startswith("/v1/"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                raise ApiError(
                    401,
                    "InvalidApiKey",
                    "missing or wrong API key; send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                )
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
        if request.path in _GENERATION_PATHS and request.method == "POST":
            request.app[SERVING].finished(
                request.path, str(state["model"]), status, state.get("generation"), time.monotonic() - started
            )


async def _parse(request: web.Request, model: type[_M]) -> _M:
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise ApiError(
            413,
            "RequestTooLarge",
            f"the request body is above {request.app[MAX_BODY]} bytes; shorten the prompt",
            code="request_too_large",
        ) from exc
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, "InvalidJson", f"the body is not valid JSON: {exc}", code="invalid_json") from exc
    if isinstance(data, dict):
        _STATE.get()["model"] = model_label(request.app[SERVING], data.get("model"))
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise ApiError(
            400, "InvalidRequest", f"{param}: {first['msg']}", param=param, code="invalid_value"
        ) from exc


def _sse(body: BaseModel) -> bytes:
    return b"data: " + body.model_dump_json(by_alias=True).encode() + b"\n\n"


async def _stream(
    request: web.Request, generation: Generation, chunks: Callable[[str, str | None], BaseModel | None]
) -> web.StreamResponse:
    """Write each output as an SSE event (``chunks`` builds it, or None to skip), then [DONE]."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    try:
        try:
            async for out in generation.outputs():
                chunk = chunks(out.text, out.finish_reason)
                if chunk is not None:
                    await response.write(_sse(chunk))
        except ApiError as err:
            _STATE.get()["outcome"] = err.status
            await response.write(_sse(err.body()))
        usage = chunks("", "__usage__")
        if usage is not None:
            await response.write(_sse(usage))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except asyncio.CancelledError:
        _STATE.get()["outcome"] = 499
        raise
    except ConnectionResetError:  # the client went away mid-stream
        _STATE.get()["outcome"] = 499
    finally:
        generation.cancel()
    return response


async def _collect(generation: Generation) -> tuple[str, str]:
    parts: list[str] = []
    reason = "stop"
    try:
        async for out in generation.outputs():
            parts.append(out.text)
            reason = out.finish_reason or reason
    finally:
        generation.cancel()
    return "".join(parts), reason


async def completions(request: web.Request) -> web.StreamResponse:
    serving = request.app[SERVING]
    body = await _parse(request, CompletionRequest)
    generation, rid = serving.submit(body)
    _STATE.get()["generation"] = generation
    if body.stream:

        def chunk(text: str, reason: str | None) -> BaseModel | None:
            if reason == "__usage__":
                if not body.include_usage:
                    return None
                usage = Usage.of(generation.prompt_tokens, generation.completion_tokens)
                return CompletionResponse(id=rid, model=body.model, choices=[], usage=usage)
            if not text and reason is None:
                return None
            choice = CompletionChoice(text=text, finish_reason=reason)
            return CompletionResponse(id=rid, model=body.model, choices=[choice])

        return await _stream(request, generation, chunk)
    text, reason = await _collect(generation)
    usage = Usage.of(generation.prompt_tokens, generation.completion_tokens)
    choice = CompletionChoice(text=text, finish_reason=reason)
    return json_response(CompletionResponse(id=rid, model=body.model, choices=[choice], usage=usage))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    serving = request.app[SERVING]
    body = await _parse(request, ChatCompletionRequest)
    generation, rid = serving.submit(body)
    _STATE.get()["generation"] = generation
    if body.stream:
        first = True

        def chunk(text: str, reason: str | None) -> BaseModel | None:
            nonlocal first
            if reason == "__usage__":
                if not body.include_usage:
                    return None
                usage = Usage.of(generation.prompt_tokens, generation.completion_tokens)
                return ChatCompletionChunk(id=rid, model=body.model, choices=[], usage=usage)
            if not text and reason is None and not first:
                return None
            delta = Delta(role="assistant" if first else None, content=text)
            first = False
            return ChatCompletionChunk(
                id=rid, model=body.model, choices=[ChatChunkChoice(delta=delta, finish_reason=reason)]
            )

        return await _stream(request, generation, chunk)
    text, reason = await _collect(generation)
    usage = Usage.of(generation.prompt_tokens, generation.completion_tokens)
    choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=reason)
    return json_response(ChatCompletionResponse(id=rid, model=body.model, choices=[choice], usage=usage))


async def models(request: web.Request) -> web.StreamResponse:
    serving = request.app[SERVING]
    engine = serving.require_engine()
    base = engine.model_name
    cards = [ModelCard(id=base, root=base, loraplane=LoraplaneModelInfo(id=None, base_model=base))]
    for v in serving.registry.ready():
        info = LoraplaneModelInfo(id=v.id, base_model=v.base_model, adapter=v.adapter)
        cards.append(ModelCard(id=v.served_name, root=base, parent=base, loraplane=info))
    return json_response(ModelList(data=cards))


async def health(request: web.Request) -> web.StreamResponse:
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.StreamResponse:
    if request.app[SERVING].engine is None:
        return web.json_response(
            {"status": "loading", "reason": "the base model is still loading"}, status=503
        )
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.StreamResponse:
    # The process-wide registry (the control path: prefetch, cache, watch, report) and the engine's own.
    engine = request.app[SERVING].engine
    body = generate_latest(REGISTRY) + (engine.metrics.render() if engine is not None else b"")
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
