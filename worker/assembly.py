"""The worker built from its parts, in one place: ``WorkerApp``, and the serve hook that starts the engine.

``WorkerApp.build`` creates every part once and gives each what it uses at construction: the registry
(what is servable, by served name and ID), the cache and its prefetcher, the watch, the controller, the
LoRAWorker report, the HTTP app and, in serve mode, the engine slot. The engine starts last: its base
weights load while /health answers and the control path validates adapters. The serve hook
(``serve_openai``) starts it and fills the slot; the parts that use the engine read it from there: the
controller loads each validated version into it before reporting it Ready, the registry tells it when a
version will get no new requests, the report reads what it holds on the device, the OpenAI routes
submit to it. The engines themselves know nothing of the registry or Kubernetes. ``WorkerApp.run``
runs the parts on one event loop and shuts them down cleanly.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import snapshot_download

from loraplane.crds.models import AdapterLimits, LoRAWorkerSpec, PoolPlacement, WorkerCapacity
from loraplane.kube import KubeClient, load_configuration
from loraplane.worker import validate
from loraplane.worker.api import webapp
from loraplane.worker.api.limits import Limiter, Limits
from loraplane.worker.cache import CacheIndex
from loraplane.worker.controller import Controller
from loraplane.worker.inference.basemodel import ModelConfig
from loraplane.worker.inference.engines import EngineSlot
from loraplane.worker.prefetch import Prefetcher
from loraplane.worker.registry import Registry
from loraplane.worker.report import WorkerReport
from loraplane.worker.settings import EngineConfig, WorkerSettings
from loraplane.worker.sources import SourceSettings
from loraplane.worker.watch import AdapterWatch

if TYPE_CHECKING:
    from aiohttp import web

    from loraplane.worker.inference.engines import Engine

log = logging.getLogger("loraplane.worker")

ServeHook = Callable[["WorkerApp"], Awaitable[None]]


class WorkerApp:
    """One worker process's parts. Build with ``WorkerApp(settings)``; ``await app.run(stop)``.

    Attributes others use: ``settings``, ``registry`` (what is servable, by served name and ID),
    ``base`` (basemodel.ModelConfig), ``model_dir`` (the checkpoint directory), ``cache``, ``prefetcher``,
    ``controller``, ``report``, ``web`` (the HTTP app), ``engine`` (the slot the serve hook fills),
    ``serve`` (the hook), ``ready`` (set when the base model is loaded and the first adapter list applied).
    """

    def __init__(self, settings: WorkerSettings, *, serve: ServeHook | None = None) -> None:
        self.settings = settings
        self.serve = serve
        self.registry: Registry = Registry()
        # Limits and fair share at the door: the watch keeps its adapter limits current (api/limits.py).
        self.limiter = Limiter()
        self.model_dir: Path | None = None
        self.base: ModelConfig | None = None
        self.cache: CacheIndex | None = None
        self.prefetcher: Prefetcher | None = None
        self.api: KubeClient | None = None
        self.watch: AdapterWatch | None = None
        self.controller: Controller | None = None
        self.report: WorkerReport | None = None
        self.kube_configuration: object | None = None  # loaded at start by main(); else in build()
        self.port: int | None = None  # the HTTP port actually bound (settings.port may be 0)
        self.web: web.Application | None = None  # the HTTP app (reads the engine from its slot)
        self.ready = asyncio.Event()
        # With a serve hook, the engine it starts; adapters become Ready only once it can serve.
        self.engine: EngineSlot | None = EngineSlot() if serve is not None else None

    # --- start-up --------------------------------------------------------------------------------
    def source_settings(self) -> SourceSettings:
        s = self.settings
        return SourceSettings(
            local_roots=tuple(Path(r) for r in s.sources.local_roots),
            hf_endpoint=s.sources.hf_endpoint or None,
            s3_endpoint_url=s.sources.s3_endpoint or None,
            s3_region=s.sources.s3_region or None,
            state_dir=Path(s.cache.cache_dir) / "state",
            options=s.sources.source_options,
        )

    def load_base_model(self) -> None:
        """Find the checkpoint (a directory, or the Hub's config and weights) and read its config."""
        s = self.settings
        model_dir = Path(s.base_model).expanduser()
        if not model_dir.is_dir():
            log.info("downloading %s from the Hub (config, tokenizer, safetensors weights)", s.base_model)
            model_dir = Path(
                snapshot_download(
                    s.base_model,
                    allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
                    endpoint=s.sources.hf_endpoint or None,
                )
            )
        self.model_dir = model_dir
        self.base = ModelConfig.from_dir(model_dir, name=s.served_model_name)
        log.info(
            "base model %s (%s, hidden %d, %d layers, context %d) served as %r",
            model_dir,
            self.base.model_type,
            self.base.hidden_size,
            self.base.num_layers,
            self.base.max_length,
            s.served_model_name,
        )

    def build(self) -> None:
        """Create the parts (after load_base_model, inside the running loop)."""
        s = self.settings
        assert self.base is not None, "load_base_model() first"
        self.cache = CacheIndex(Path(s.cache.cache_dir), max(s.cache.cache_bytes, 1))
        self.prefetcher = Prefetcher(
            self.cache, s.cache.max_concurrent_downloads, sources_settings=self.source_settings()
        )
        self.api = KubeClient(
            self.kube_configuration or load_configuration(s.kubeconfig), user_agent="loraplane-worker"
        )
        me = f"{s.report.object_namespace}/{s.object_name}"  # as status.placement names this worker
        self.watch = AdapterWatch(
            self.api, s.served_model_name, s.namespaces, me=me, elsewhere=self.registry.elsewhere
        )
        self.watch.on_limits = self._set_limits
        spec = LoRAWorkerSpec(
            baseModel=s.served_model_name,
            podName=s.report.pod_name or None,
            nodeName=s.report.node_name or None,
            endpoint=s.report.endpoint or None,
            capacity=WorkerCapacity(
                maxLoras=s.engine.max_loras,
                maxLoraRank=s.engine.max_lora_rank,
                maxCpuLoras=s.engine.max_cpu_loras,
                cacheBytes=s.cache.cache_bytes,
                maxAdapters=s.report.max_adapters or None,
            ),
            placement=PoolPlacement(
                defaultReplicas=s.report.default_replicas, maxReplicas=s.report.max_replicas
            ),
        )
        cache, watch = self.cache, self.watch
        self.report = WorkerReport(
            self.api,
            name=s.object_name,
            namespace=s.report.object_namespace,
            spec=spec,
            lookup=lambda i: self.controller.report(i) if self.controller else None,
            known_ids=lambda: self.controller.known_ids() if self.controller else [],
            cache_bytes_used=lambda: cache.used_bytes,
            assigned=lambda: len(watch.desired),
            on_device=None if self.engine is None else self.engine.on_device,
            throttled=(
                (lambda: self.limiter.throttled_ids(s.report.throttled_seconds))
                if self.serve is not None
                else None
            ),
            pod_name=s.report.pod_name,
            batch_seconds=s.report.report_batch_seconds,
            heartbeat_seconds=s.report.heartbeat_seconds,
        )
        self.controller = Controller(
            self.registry,
            self.prefetcher,
            self.base,
            self.source_settings(),
            served_model=s.served_model_name,
            max_lora_rank=s.engine.max_lora_rank,
            dtype=validate.serving_dtype(s.engine.dtype, s.engine.kind, s.engine.device, self.base),
            max_concurrent=s.cache.max_concurrent_prepares,
            on_change=self.report.mark_dirty,
            engine=self.engine,
            trust=s.provenance.trust(),
            require_signatures=s.provenance.signatures_required,
        )
        if self.engine is not None:
            # The one hand-over to the engine: a version that gets no new requests leaves it once the
            # requests running on it finish.
            self.registry.on_retired(self.engine.retire_adapter)
        self.web = self.http_app()

    # --- running ---------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set (or a part fails); then shut down cleanly."""
        if self.base is None:
            await asyncio.to_thread(self.load_base_model)
        self.build()
        assert self.watch and self.controller and self.report and self.api
        tasks = [
            asyncio.create_task(self.watch.run(), name="watch"),
            asyncio.create_task(self.controller.run(self.watch), name="controller"),
            asyncio.create_task(self.report.run(), name="report"),
            asyncio.create_task(self._http(), name="http"),
        ]
        helpers = [asyncio.create_task(self._mark_ready(), name="ready")]
        stopper = asyncio.create_task(stop.wait(), name="stop")
        try:
            done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper:
                    # These loops run until cancelled: ending at all is a bug; say which and why.
                    error = task.exception()
                    log.error("%s ended unexpectedly", task.get_name(), exc_info=error)
                    raise error or RuntimeError(f"{task.get_name()} ended unexpectedly")
        finally:
            if stopper.done() and self.web is not None:  # a stop, not a crash: let requests finish
                await webapp.drain(self.web, self.settings.serving.drain_seconds)
            for task in [stopper, *tasks, *helpers]:
                task.cancel()
            await asyncio.gather(stopper, *tasks, *helpers, return_exceptions=True)
            await self.report.delete()
            await self.api.close()
            log.info("worker stopped")

    async def _mark_ready(self) -> None:
        assert self.controller is not None
        await self.controller.synced.wait()
        self.ready.set()
        log.info("first adapter list applied; worker ready")

    async def _http(self) -> None:
        """The HTTP server; with a serve hook, the hook then starts the engine and fills its slot."""
        assert self.web is not None, "build() first"
        runner, self.port = await webapp.start(
            self.web, self.settings.serving.host, self.settings.serving.port
        )
        log.info(
            "HTTP on %s:%d (/health, /ready, /metrics, /adapters%s)",
            self.settings.serving.host,
            self.port,
            ", /v1" if self.serve is not None else "",
        )
        try:
            if self.serve is not None:
                await self.serve(self)
            else:
                await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    def _set_limits(self, adapter: str, spec: AdapterLimits | None, replicas: int) -> None:
        """The watch saw an adapter's spec.limits (None: gone): this worker's share applies at once."""
        limits = Limits.of_adapter(spec, replicas)
        book = self.limiter.book
        if limits == book.get(adapter):
            return
        if limits is None:
            book.pop(adapter, None)
        else:
            book[adapter] = limits
        log.info("adapter %s: limits on this worker %s (%d replicas)", adapter, limits, replicas)

    def http_app(self) -> web.Application:
        """The worker's HTTP app: probes, /metrics, /adapters, and the OpenAI API when serving.
        /ready also waits for the first adapter list, so a pod joins its Service only when it serves
        what the cluster asks of it."""

        def reports() -> list[dict[str, object]]:
            return [
                r.model_dump(exclude_none=True)
                for r in (self.controller.reports() if self.controller else [])
            ]

        app = webapp.build_app(
            self.engine,
            self.registry,
            self.settings.serve_settings(),
            openai=self.serve is not None,
            reports=reports,
            quarantine=None if self.controller is None else self.controller.quarantine,
        )
        app[webapp.HEALTH].ready.append(
            lambda: None if self.ready.is_set() else "the first adapter list is not applied yet"
        )
        if self.serve is not None:
            from loraplane.worker.api.routes import SERVING

            app[SERVING].limiter = self.limiter
        return app


async def serve_openai(app: WorkerApp) -> None:
    """The ServeHook of ``loraplane-worker`` (the HTTP server listens already): start the engine the
    pool chose, fill the slot the parts read it from, and run until cancelled."""
    s = app.settings
    assert app.engine is not None and app.model_dir is not None, "WorkerApp builds its parts first"
    log.info("loading the base model into the %s engine", s.engine.kind)
    engine = None
    try:
        engine = await start_engine(s.engine, s.served_model_name, app.model_dir)
        app.engine.fill(engine)
        if app.report is not None:
            app.report.waiting = engine.waiting_by_adapter  # demand for the operator's replicas
            app.report.mark_dirty()  # what the engine holds on the device joins the report
        log.info("%s engine ready: serving %r and its adapters", engine.kind, engine.model_name)
        await asyncio.Event().wait()
    finally:
        if engine is not None:
            # Here, not in a thread: a cancelled await would skip it, and vLLM's engine-core process
            # outlives a worker that exits without shutting it down.
            engine.stop()


async def start_engine(config: EngineConfig, served_model_name: str, model_dir: Path) -> Engine:
    """Load the base model into the engine a worker pool chose, on the running event loop (the vLLM
    engine serves from it; the built-in one loads in a thread and runs its own)."""
    if config.kind == "vllm":  # vllm and torch are imported only by the pool that runs them
        from loraplane.worker.vllm.engine import VllmEngine

        return await VllmEngine.start(model_dir, config.vllm(served_model_name))
    from loraplane.worker.builtin.service import Engine as BuiltinEngine

    return await asyncio.to_thread(BuiltinEngine.start, model_dir, config.builtin(served_model_name))
