"""The worker's serving side: load the engine and attach it to the worker's HTTP server.

The server (``WorkerApp.http_app``: probes, /metrics, /adapters, /v1) is already listening when this
hook starts (``/health`` answers, ``/ready`` and ``/v1`` say 503 while loading); the base model's
weights load in a thread next to the control path, and the engine starts serving once they are in
memory.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loraplane.worker.main import WorkerApp

log = logging.getLogger("loraplane.worker")


async def serve_openai(app: WorkerApp) -> None:
    """The ServeHook of ``loraplane-worker``: runs until cancelled."""
    from loraplane.worker.api.server import set_engine
    from loraplane.worker.engine.service import Engine, EngineSettings

    s = app.settings
    assert app.web is not None, "WorkerApp starts its HTTP server before the serve hook"
    log.info("loading the base model into the engine")
    engine = None
    try:
        assert app.model_dir is not None, "load_base_model() runs before the HTTP side"
        engine = await asyncio.to_thread(
            Engine.start, app.model_dir, EngineSettings.from_worker(s), app.registry
        )
        if app.report is not None:
            tiers = engine.tiers
            app.report.on_device = lambda: set(tiers.slot_of)  # one C-level copy: safe across threads
            app.report.mark_dirty()
        set_engine(app.web, engine)
        if app.engine_ready is not None:
            app.engine_ready.set()
        log.info("engine ready: serving %r and its adapters", engine.model_name)
        await asyncio.Event().wait()
    finally:
        if engine is not None:
            await asyncio.to_thread(engine.stop)
