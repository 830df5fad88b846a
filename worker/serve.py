"""The worker's default HTTP side: the OpenAI API and the control routes on one port.

The port opens at once (``/health`` answers, ``/ready`` and ``/v1`` say 503 while loading); the base
model's weights load in a thread next to the control path, and the engine starts serving once they
are in memory. ``/ready`` then waits for the first adapter list too, so a pod joins its Service only
when it serves what the cluster asks of it.
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
    from loraplane.worker.api.server import ServeSettings, build_app, set_engine, start
    from loraplane.worker.engine.service import Engine, EngineSettings

    s = app.settings
    web_app = build_app(
        None, app.registry, ServeSettings(host=s.host, port=s.port, access_log=s.access_log_on)
    )
    app.add_control_routes(web_app)
    runner, app.port = await start(web_app, s.host, s.port)
    log.info("OpenAI API on %s:%d (loading the base model)", s.host, app.port)
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
        set_engine(web_app, engine)
        if app.engine_ready is not None:
            app.engine_ready.set()
        log.info("engine ready: serving %r and its adapters", engine.model_name)
        await asyncio.Event().wait()
    finally:
        if engine is not None:
            await asyncio.to_thread(engine.stop)
        await runner.cleanup()
