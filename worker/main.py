"""``loraplane-worker``: the worker process that ties watch, controller, report and the HTTP server together.

``WorkerApp`` holds the pieces (settings, base model info, registry, cache, watch, controller, report)
and runs them on one event loop. The HTTP side is a hook: ``app.serve`` (a coroutine function taking
the app) is started with the rest, so the OpenAI API server can run inside this process and read the
same registry. One HTTP server (``loraplane.worker.api.server``) answers /health, /ready, /metrics and
/adapters in both modes, and the OpenAI API when serving. SIGTERM and SIGINT stop it cleanly: the
server drains (no new requests; those in flight finish within --drain-seconds), tasks are cancelled,
the LoRAWorker object is deleted, the exit code is 0.

Nothing heavy is imported at module level, so ``loraplane-worker --help`` is fast.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loraplane import parent
from loraplane.worker import settings as settings_mod
from loraplane.worker.settings import ConfigError, WorkerSettings

if TYPE_CHECKING:
    from aiohttp import web

    from loraplane.crds.kube import KubeClient
    from loraplane.worker.basemodel import ModelConfig
    from loraplane.worker.cache import AdapterCache
    from loraplane.worker.controller import Controller
    from loraplane.worker.registry import Registry
    from loraplane.worker.report import WorkerReport
    from loraplane.worker.sources import SourceSettings
    from loraplane.worker.watch import AdapterWatch

log = logging.getLogger("loraplane.worker")

ServeHook = Callable[["WorkerApp"], Awaitable[None]]


class WorkerApp:
    """One worker process's parts. Build with ``WorkerApp(settings)``; ``await app.run(stop)``.

    Attributes others use: ``settings``, ``registry`` (what is servable, by served name and ID),
    ``base`` (basemodel.ModelConfig), ``model_dir`` (the checkpoint directory), ``cache``, ``controller``,
    ``report`` (set ``report.on_device`` to the engine's slot query), ``serve`` (the HTTP hook),
    ``ready`` (set when the base model is loaded and the first adapter list applied).
    """

    def __init__(self, settings: WorkerSettings, *, serve: ServeHook | None = None) -> None:
        from loraplane.worker.registry import Registry

        self.settings = settings
        self.serve = serve
        self.registry: Registry = Registry()
        self.adapter_limits: dict[str, Any] = {}  # namespace/name -> this worker's share (api/limits.py)
        self.model_dir: Path | None = None
        self.base: ModelConfig | None = None
        self.cache: AdapterCache | None = None
        self.api: KubeClient | None = None
        self.watch: AdapterWatch | None = None
        self.controller: Controller | None = None
        self.report: WorkerReport | None = None
        self.kube_configuration: object | None = None  # loaded at start by main(); else in build()
        self.port: int | None = None  # the HTTP port actually bound (settings.port may be 0)
        self.web: web.Application | None = None  # the HTTP app (the serve hook attaches the engine)
        self.ready = asyncio.Event()
        # With a serve hook, adapters become Ready only once the hook sets this (the engine can serve).
        self.engine_ready: asyncio.Event | None = asyncio.Event() if serve is not None else None

    # --- start-up --------------------------------------------------------------------------------
    def source_settings(self) -> SourceSettings:
        from loraplane.worker.sources import SourceSettings

        s = self.settings
        return SourceSettings(
            local_roots=tuple(Path(r) for r in s.local_roots),
            hf_endpoint=s.hf_endpoint or None,
            s3_endpoint_url=s.s3_endpoint or None,
            s3_region=s.s3_region or None,
            state_dir=Path(s.cache_dir) / "state",
            options=s.source_options,
        )

    def load_base_model(self) -> None:
        """Find the checkpoint (a directory, or the Hub's config and weights) and read its config."""
        from loraplane.worker.basemodel import ModelConfig

        s = self.settings
        model_dir = Path(s.base_model).expanduser()
        if not model_dir.is_dir():
            from huggingface_hub import snapshot_download

            log.info("downloading %s from the Hub (config, tokenizer, safetensors weights)", s.base_model)
            model_dir = Path(
                snapshot_download(
                    s.base_model,
                    allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
                    endpoint=s.hf_endpoint or None,
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
        from loraplane.crds.kube import KubeClient, load_configuration
        from loraplane.crds.models import LoRAWorkerSpec, WorkerCapacity
        from loraplane.worker import validate
        from loraplane.worker.cache import AdapterCache
        from loraplane.worker.controller import Controller
        from loraplane.worker.report import WorkerReport
        from loraplane.worker.watch import AdapterWatch

        s = self.settings
        assert self.base is not None, "load_base_model() first"
        self.cache = AdapterCache(
            Path(s.cache_dir),
            max(s.cache_bytes, 1),
            s.max_concurrent_downloads,
            sources_settings=self.source_settings(),
        )
        self.api = KubeClient(
            self.kube_configuration or load_configuration(s.kubeconfig), user_agent="loraplane-worker"
        )
        self.watch = AdapterWatch(self.api, s.served_model_name, s.namespaces)
        self.watch.on_limits = self._set_limits
        spec = LoRAWorkerSpec(
            baseModel=s.served_model_name,
            podName=s.pod_name or None,
            nodeName=s.node_name or None,
            endpoint=s.endpoint or None,
            capacity=WorkerCapacity(
                maxLoras=s.max_loras,
                maxLoraRank=s.max_lora_rank,
                maxCpuLoras=s.max_cpu_loras,
                cacheBytes=s.cache_bytes,
            ),
        )
        cache = self.cache
        self.report = WorkerReport(
            self.api,
            name=s.object_name,
            namespace=s.object_namespace,
            spec=spec,
            lookup=lambda i: self.controller.report(i) if self.controller else None,
            known_ids=lambda: self.controller.known_ids() if self.controller else [],
            cache_bytes_used=lambda: cache.used_bytes,
            pod_name=s.pod_name,
            batch_seconds=s.report_batch_seconds,
            heartbeat_seconds=s.heartbeat_seconds,
        )
        self.controller = Controller(
            self.registry,
            self.cache,
            self.base,
            self.source_settings(),
            served_model=s.served_model_name,
            max_lora_rank=s.max_lora_rank,
            dtype=validate.serving_dtype(s.dtype, s.engine, s.device, self.base),
            max_concurrent=s.max_concurrent_prepares,
            on_change=self.report.mark_dirty,
            engine_ready=self.engine_ready,
            trust=s.trust(),
            require_signatures=s.signatures_required,
        )

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
                from loraplane.worker.api.server import drain

                await drain(self.web, self.settings.drain_seconds)
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
        """The HTTP server; with a serve hook, the hook then loads the engine and attaches it."""
        from loraplane.worker.api.server import start

        self.web = self.http_app()
        runner, self.port = await start(self.web, self.settings.host, self.settings.port)
        log.info(
            "HTTP on %s:%d (/health, /ready, /metrics, /adapters%s)",
            self.settings.host,
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

    def _set_limits(self, adapter: str, spec: Any, replicas: int) -> None:
        """The watch saw an adapter's spec.limits (None: gone): this worker's share applies at once."""
        from loraplane.worker.api.limits import Limits

        limits = Limits.of_adapter(spec, replicas)
        if limits == self.adapter_limits.get(adapter):
            return
        if limits is None:
            self.adapter_limits.pop(adapter, None)
        else:
            self.adapter_limits[adapter] = limits
        log.info("adapter %s: limits on this worker %s (%d replicas)", adapter, limits, replicas)

    def http_app(self) -> web.Application:
        """The worker's HTTP app: probes, /metrics, /adapters, and the OpenAI API when serving.
        /ready also waits for the first adapter list, so a pod joins its Service only when it serves
        what the cluster asks of it."""
        from loraplane.worker.api.server import HEALTH, ServeSettings, build_app

        def reports() -> list[dict[str, object]]:
            return [
                r.model_dump(exclude_none=True)
                for r in (self.controller.reports() if self.controller else [])
            ]

        app = build_app(
            None,
            self.registry,
            ServeSettings.from_worker(self.settings),
            openai=self.serve is not None,
            reports=reports,
        )
        app[HEALTH].ready.append(
            lambda: None if self.ready.is_set() else "the first adapter list is not applied yet"
        )
        if self.serve is not None:
            from loraplane.worker.api.routes import SERVING

            app[SERVING].limiter.book = self.adapter_limits
        return app


def _configure_logging(level: str, log_format: str = "text") -> None:
    from loraplane import telemetry

    telemetry.configure_logging("worker", level=level, log_format=log_format)
    telemetry.build_info("worker")
    if level != "DEBUG":  # one line per HTTP request to a Hub or S3 is noise at INFO
        for name in ("httpx", "httpx2", "httpcore", "botocore", "urllib3"):
            logging.getLogger(name).setLevel(logging.WARNING)


async def _main_async(app: WorkerApp) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.run(stop)


def main(argv: list[str] | None = None, *, serve: ServeHook | None = None) -> int:
    """Entry point of ``loraplane-worker``; returns the exit code (2 for bad configuration)."""
    parent.exit_with_parent()  # started by `loraplane demo`: stop with it, even when it is killed
    try:
        settings = settings_mod.load(argv)
    except ConfigError as e:
        print(f"loraplane-worker: {e}", file=sys.stderr)
        return 2
    _configure_logging(settings.log_level, settings.log_format)
    if serve is None and settings.mode == "serve":
        from loraplane.worker.serve import serve_openai

        serve = serve_openai
    app = WorkerApp(settings, serve=serve)
    try:
        app.load_base_model()
    except Exception as e:  # a LoraplaneError names the problem; anything else too, without a trace
        print(f"loraplane-worker: --base-model {settings.base_model}: {e}", file=sys.stderr)
        return 2
    from loraplane.crds.errors import CredentialsError
    from loraplane.crds.kube import load_configuration

    try:
        app.kube_configuration = load_configuration(settings.kubeconfig or None)
    except CredentialsError as e:
        print(f"loraplane-worker: --kubeconfig: {e.message}", file=sys.stderr)
        return 2
    code = 0
    loop = asyncio.new_event_loop()
    # Our own executor, so shutdown does not wait for a download in flight: the cache is crash-safe
    # (partial files are discarded at the next start), and Kubernetes would SIGKILL us anyway.
    executor = concurrent.futures.ThreadPoolExecutor(thread_name_prefix="loraplane-io")
    loop.set_default_executor(executor)
    try:
        loop.run_until_complete(_main_async(app))
    except KeyboardInterrupt:
        pass
    except Exception:
        log.exception("worker failed")
        code = 1
    finally:
        executor.shutdown(wait=False, cancel_futures=True)
        loop.close()
    pool = [t for t in threading.enumerate() if t.name.startswith("loraplane-io")]
    deadline = time.monotonic() + 0.5
    for t in pool:  # idle pool threads exit at once on shutdown; busy ones are in a blocking call
        t.join(max(0.0, deadline - time.monotonic()))
    busy = [t for t in pool if t.is_alive()]
    if busy:
        log.info("abandoning %d blocking call(s) in flight (downloads restart at the next start)", len(busy))
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    gc.freeze()  # exiting: the final collections need not walk the model's objects (seconds under load)
    return code


if __name__ == "__main__":
    sys.exit(main())
