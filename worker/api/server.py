"""The worker's HTTP server: builds the aiohttp app and runs it (blocking, in a thread, or on a loop).

``build_app(engine, registry, settings)`` may get ``engine=None`` while the base model loads;
/health answers at once, /ready and the /v1 routes answer 503 until ``set_engine`` is called. No
route loads an adapter from a path: adapters reach the engine only through the registry, which the
control path fills from LoRAAdapter objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from aiohttp import web

from ..engine.service import Engine
from ..registry import Registry
from .routes import API_KEY, MAX_BODY, SERVING, add_routes, middleware
from .serving import Serving


@dataclass
class ServeSettings:
    """HTTP-side settings."""

    host: str = "127.0.0.1"
    """Address to listen on."""
    port: int = 8000
    """TCP port; 0 picks a free one."""
    api_key: str = ""
    """Bearer token the /v1 routes require; empty: no authentication."""
    max_body_bytes: int = 1 << 20
    """Largest request body in bytes; larger ones get 413."""
    retry_after_s: int = 5
    """Seconds in Retry-After when an adapter is not ready yet or the model is loading."""
    access_log: bool = True
    """One log line per /v1 completion (logger loraplane.worker.access)."""


def build_app(
    engine: Engine | None, registry: Registry, settings: ServeSettings | None = None
) -> web.Application:
    settings = settings or ServeSettings()
    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[middleware])
    serving = Serving(registry, retry_after_s=settings.retry_after_s, access_log=settings.access_log)
    serving.engine = engine
    app[SERVING] = serving
    app[API_KEY] = settings.api_key
    app[MAX_BODY] = settings.max_body_bytes
    add_routes(app)
    return app


def set_engine(app: web.Application, engine: Engine) -> None:
    """The base model finished loading: start serving (and answering /ready)."""
    app[SERVING].engine = engine


async def start(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Start listening on the running loop; returns the runner (``await runner.cleanup()``) and the port."""
    # handler_cancellation: a client that disconnects cancels its handler, which cancels its request.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    server = site._server
    bound = server.sockets[0].getsockname()[1] if server is not None and server.sockets else port
    return runner, int(bound)


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


def serve(engine: Engine, registry: Registry, settings: ServeSettings) -> None:
    """Blocking: serve until interrupted."""
    web.run_app(
        build_app(engine, registry, settings),
        host=settings.host,
        port=settings.port,
        handler_cancellation=True,
        access_log=None,
    )
