"""The worker's serving side: start the engine the pool chose and wire it to the control path.

The server (``WorkerApp.http_app``: probes, /metrics, /adapters, /v1) is already listening when this
hook starts (``/health`` answers, ``/ready`` and ``/v1`` say 503 while loading); the base model's
weights load next to the control path, and the engine starts serving once they are in memory.

The wiring is the only place that knows both sides: the controller hands each validated version to
the engine before reporting it Ready (``engine.add_adapter``), the registry tells the engine when a
version will get no new requests (``engine.retire_adapter``), and the report shows what the engine
holds. The engines themselves know nothing of the registry or Kubernetes.
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
    from loraplane.worker import engines
    from loraplane.worker.api.server import quarantine_in, set_engine

    s = app.settings
    assert app.web is not None, "WorkerApp starts its HTTP server before the serve hook"
    log.info("loading the base model into the %s engine", s.engine)
    engine = None
    try:
        assert app.model_dir is not None, "load_base_model() runs before the HTTP side"
        engine = await engines.start(s.engine, app.model_dir, s)  # type: ignore[arg-type]
        if app.controller is not None:
            app.controller.load_adapter = engine.add_adapter
        if app.report is not None:
            from loraplane.worker.api.routes import SERVING

            app.report.on_device = engine.on_device
            app.report.throttled = app.web[SERVING].limiter.throttled_ids
            app.report.mark_dirty()
        set_engine(app.web, engine)
        if app.controller is not None:
            quarantine_in(app.web, app.controller.quarantine)
        if app.engine_ready is not None:
            app.engine_ready.set()
        log.info("%s engine ready: serving %r and its adapters", engine.kind, engine.model_name)
        await asyncio.Event().wait()
    finally:
        if engine is not None:
            # Here, not in a thread: a cancelled await would skip it, and vLLM's engine-core process
            # outlives a worker that exits without shutting it down.
            engine.stop()
