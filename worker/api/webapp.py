"""The worker's one HTTP server: probes, /metrics and /adapters always; the OpenAI API when serving.

``build_app(engine, registry, settings)`` builds it; ``engine`` (an ``EngineSlot``) is empty while the
base model loads (/health answers at once, /ready and the /v1 routes answer 503 until it is filled). A control-mode
worker builds it with ``openai=False``: the same probes, auth and /adapters, no /v1 routes and no
engine imported. No route loads an adapter from a path: adapters reach the engine only through the
registry, which the control path fills from LoRAAdapter objects.

Probes (the chart calls these; no other spelling):
- ``/health`` (liveness) fails when a part of the process that cannot recover is stuck or dead
  (the engine thread died, or has not come round its loop in ``engine_stall_seconds``), so the
  kubelet restarts the pod.
- ``/ready`` (readiness) fails while the worker cannot take work: loading, not yet synced, unhealthy,
  or draining.

``drain(app, seconds)`` is the SIGTERM path: /ready and new generation requests answer 503 at once,
requests and streams in flight run to their end, for at most ``seconds``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from .. import redaction
from ..inference.engines import EngineSlot
from .auth import ApiKeys, Key
from .errors import ApiError

if TYPE_CHECKING:
    from ..registry import Registry

log = logging.getLogger(__name__)

Check = Callable[[], "str | None"]
"""A probe check: what is wrong (a sentence), or None."""
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
GENERATION_PATHS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/responses"})


@dataclass
class ServeSettings:
    """HTTP-side settings (the worker builds them from its settings: settings.WorkerSettings.serve_settings)."""

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8000
    """TCP port; 0 picks a free one."""
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    """Bearer tokens accepted on every path but ``public_paths``; none (and no file): no authentication."""
    api_key_file: str = ""
    """A file of API keys, one per line, re-read when it changes (a mounted Secret)."""
    public_paths: tuple[str, ...] = ("/health", "/ready", "/metrics")
    """Paths answered without an API key (probes and scrapes)."""
    max_body_bytes: int = 1 << 20
    """Largest request body in bytes; larger ones get 413."""
    client_timeout_seconds: float = 30.0
    """Seconds a client may take to send its body (then 408) or to take a stream's next chunk (then
    the stream is cut off): a client that stalls holds no connection, request or drain for longer."""
    max_logprob_entries: int = 65536
    """Most log probabilities one request may ask for: n x (logprobs + 1) x max_tokens. Each is Python
    work on the server's one event loop; a request above it gets 400 TooManyLogprobs."""
    max_schema_bytes: int = 16384
    """Largest response_format JSON schema in bytes (compact JSON). The engine compiles it into a
    grammar, which takes CPU time that grows with it; a larger one gets 400 SchemaTooLarge."""
    retry_after_s: int = 5
    """Seconds in Retry-After when an adapter is not ready yet, the model is loading, or draining."""
    access_log: bool = True
    """One log line per /v1 completion (logger loraplane.worker.access)."""
    drain_seconds: float = 45.0
    """On SIGTERM: seconds requests in flight may take to finish (below the pod's grace period)."""
    engine_stall_seconds: float = 60.0
    """/health fails when the engine loop has not come round for this many seconds."""


class Health:
    """What the probes answer: checks the process's parts register, the drain, requests in flight."""

    def __init__(self) -> None:
        self.live: list[Check] = []
        self.ready: list[Check] = []
        self.metrics: list[Callable[[], bytes]] = []
        self.cut: list[Callable[[Any], int]] = []
        """End every running request now with the error given (the drain's deadline)."""
        self.draining = False
        self.in_flight = 0

    @staticmethod
    def problems(checks: list[Check]) -> list[str]:
        return [p for p in (check() for check in checks) if p]


SETTINGS = web.AppKey("serve_settings", ServeSettings)
HEALTH = web.AppKey("health", Health)
KEYS = web.AppKey("api_keys", ApiKeys)
API_KEY = web.RequestKey("api_key", Key)
"""Where the gate leaves the matched ``auth.Key`` on the request (fair share and limits read it)."""


def _error(err: ApiError) -> web.Response:
    return web.Response(
        text=err.body().model_dump_json(),
        status=err.status,
        headers=err.headers,
        content_type="application/json",
    )


@web.middleware
async def gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Auth on every non-public path; while draining or while the engine is dead or stuck, new
    generation requests get 503; count the rest (the drain waits for them)."""
    app = request.app
    keys = app[KEYS]
    if keys.enabled and request.path not in app[SETTINGS].public_paths:
        given = request.headers.getall("Authorization", [])
        if len(given) > 1:  # proxies and servers disagree on which one counts: pick none
            return _error(
                ApiError(
                    400,
                    "InvalidRequest",
                    f"{len(given)} Authorization headers; send exactly one 'Authorization: Bearer <key>'",
                    param="Authorization",
                    code="invalid_request",
                )
            )
        key = keys.match(given[0] if given else "")
        if key is None:
            return _error(
                ApiError(
                    401,
                    "InvalidApiKey",
                    "missing or wrong API key; send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            )
        request[API_KEY] = key
    if request.path not in GENERATION_PATHS or request.method != "POST":
        return await handler(request)
    health = app[HEALTH]
    if health.draining:
        return _error(
            ApiError(
                503,
                "ShuttingDown",
                "this worker is shutting down and takes no new requests; retry (another replica serves it)",
                code="unavailable",
                headers={"Retry-After": str(app[SETTINGS].retry_after_s), "Connection": "close"},
            )
        )
    problems = Health.problems(health.live)
    if problems:  # refuse at once rather than queue work for an engine that cannot take it
        return _error(
            ApiError(
                503,
                "EngineUnavailable",
                f"this worker cannot serve now: {problems[0]}; retry (another replica serves it)",
                code="unavailable",
                headers={"Retry-After": str(app[SETTINGS].retry_after_s)},
            )
        )
    health.in_flight += 1
    try:
        return await handler(request)
    finally:
        health.in_flight -= 1


async def health(request: web.Request) -> web.StreamResponse:
    problems = Health.problems(request.app[HEALTH].live)
    if problems:
        return web.json_response({"status": "unhealthy", "problems": problems}, status=503)
    return web.json_response({"status": "ok"})


async def ready(request: web.Request) -> web.StreamResponse:
    h = request.app[HEALTH]
    if h.draining:
        return web.json_response({"status": "draining", "inFlight": h.in_flight}, status=503)
    problems = Health.problems(h.live + h.ready)
    if problems:
        return web.json_response({"status": "not ready", "problems": problems}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.StreamResponse:
    # The process-wide registry (the control path) and whatever else registered (the engine's own).
    body = generate_latest(REGISTRY) + b"".join(render() for render in request.app[HEALTH].metrics)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(
    engine: EngineSlot | None,
    registry: Registry | None,
    settings: ServeSettings | None = None,
    *,
    openai: bool = True,
    reports: Callable[[], list[dict[str, Any]]] | None = None,
    quarantine: Callable[[int, Any], None] | None = None,
) -> web.Application:
    """The app: probes, /metrics, /adapters (when ``reports`` is given) and, with ``openai``, /v1 on the
    engine in ``engine`` (a slot filled once the base model is loaded). ``quarantine(adapter_id, error)``
    takes an adapter version out of service when the engine finds it unservable while serving it (NaN /
    Inf output)."""
    settings = settings or ServeSettings()
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[gate])
    app[SETTINGS] = settings
    app[HEALTH] = Health()
    app[KEYS] = ApiKeys(settings.api_keys, settings.api_key_file)
    app[HEALTH].ready.append(app[KEYS].problem)
    redaction.install()  # the keys (and any credential) stay out of every log line and traceback
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    if reports is not None:

        async def adapters(_: web.Request) -> web.StreamResponse:
            # Source URIs and failure messages: behind the API key like /v1 (not in public_paths).
            return web.json_response(reports())

        app.router.add_get("/adapters", adapters)
    if openai:
        from .routes import add_openai  # the engine side (torch) only where it serves

        assert registry is not None, "the OpenAI API reads the registry"
        add_openai(app, engine or EngineSlot(), registry, quarantine)
    return app


async def drain(app: web.Application, seconds: float) -> int:
    """Stop taking generation requests, wait up to ``seconds`` for those in flight; returns how many
    were still running at the deadline (each has then been ended with a ShuttingDown error)."""
    h = app[HEALTH]
    h.draining = True
    log.info("draining: %d requests in flight, up to %.0f s", h.in_flight, seconds)
    deadline = time.monotonic() + seconds
    while h.in_flight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if h.in_flight:
        log.warning("drain deadline reached with %d requests still in flight", h.in_flight)
        if h.cut:
            from loraplane.errors import TemporaryError

            # Each ends now with a ShuttingDown event (then [DONE]), ahead of the outputs it has not
            # sent: a stream with a backlog would otherwise still be writing it when the server closes
            # the connection, and its client would take a truncated answer for a whole one.
            error = TemporaryError(
                "ShuttingDown", "the worker is shutting down; retry (another replica serves it)"
            )
            for cut in h.cut:
                cut(error)
            until = time.monotonic() + 1.0
            while h.in_flight and time.monotonic() < until:
                await asyncio.sleep(0.01)
    else:
        log.info("drained: no requests in flight")
    return h.in_flight


async def start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start listening on the running loop; returns the runner (``await runner.cleanup()``) and the port."""
    # handler_cancellation: a client that disconnects cancels its handler, which cancels its request.
    # shutdown_timeout: cleanup() comes after the drain, so what is left is cut off quickly.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, int(runner.addresses[0][1]) if runner.addresses else port


@contextlib.contextmanager
def serve_in_thread(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Run the app on its own event loop in a thread (tests, the demo); yields the base URL."""
    loop = asyncio.new_event_loop()
    started: dict[str, object] = {}
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            started["runner"], started["port"] = loop.run_until_complete(start(app, host, port))
        except BaseException as exc:  # surface bind errors to the caller
            started["error"] = exc
        ready.set()
        if "error" not in started:
            loop.run_forever()

    thread = threading.Thread(target=run, name="loraplane-http", daemon=True)
    thread.start()
    if not ready.wait(30):
        raise TimeoutError("the HTTP server did not start within 30 s")
    if "error" in started:
        raise started["error"]  # type: ignore[misc]
    try:
        yield f"http://{host}:{started['port']}"
    finally:
        runner: web.AppRunner = started["runner"]  # type: ignore[assignment]
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
