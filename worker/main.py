"""``loraplane-worker``, the console script: read the settings, build the worker (``assembly.WorkerApp``)
and run it on one event loop until SIGTERM or SIGINT, which stop it cleanly: the HTTP server drains (no
new requests; those in flight finish within --drain-seconds), tasks are cancelled, the LoRAWorker
object is deleted, the exit code is 0. ``main(argv, serve=hook)`` takes another serve hook (what runs
once the HTTP server listens; by default ``assembly.serve_openai`` in serve mode).

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
from typing import TYPE_CHECKING

from loraplane import parent
from loraplane.worker import settings as settings_mod
from loraplane.worker.settings import ConfigError

if TYPE_CHECKING:
    from loraplane.worker.assembly import ServeHook, WorkerApp

log = logging.getLogger("loraplane.worker")


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
    from loraplane.worker.assembly import WorkerApp, serve_openai

    if serve is None and settings.mode == "serve":
        serve = serve_openai
    app = WorkerApp(settings, serve=serve)
    try:
        app.load_base_model()
    except Exception as e:  # a LoraplaneError names the problem; anything else too, without a trace
        print(f"loraplane-worker: --base-model {settings.base_model}: {e}", file=sys.stderr)
        return 2
    from loraplane.errors import CredentialsError
    from loraplane.kube import load_configuration

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
