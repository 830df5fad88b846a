"""Thin kopf handlers and kopf's settings: every decision lives in reconciler.py, allocation.py, names.py
and aggregate.py.

Only ``kopf.on.event`` handlers are used: they keep no progress, diff-base or finalizer on the objects,
so kopf itself writes nothing to adapters (every write is the operator's own checked status write).
The reconciler lives in kopf's memo, which main.py keeps across restarts of kopf (after the API server
went away): what it has seen, the highest ID above all, survives them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf

from loraplane.crds.models import ADAPTER_PLURAL, GROUP, VERSION, WORKER_PLURAL
from loraplane.errors import APIError
from loraplane.kube import Backoff, KubeClient, bearer_token, load_configuration
from loraplane.operator import bbr, metrics
from loraplane.operator.reconciler import Reconciler
from loraplane.operator.settings import OperatorSettings

log = logging.getLogger("loraplane.operator")

SETTINGS = OperatorSettings()  # Set by main() before kopf starts.
RETRY = Backoff(start=0.5, cap=10.0)  # Requests kopf retries, and the start-up listing.


def kopf_settings() -> kopf.OperatorSettings:
    """kopf's settings for this operator: fewer writes, less latency, and never giving up on the API."""
    settings = kopf.OperatorSettings()
    # No progress annotations, kopf's own Events only for errors, a short batching window.
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="loraplane.io")
    settings.posting.level = logging.ERROR
    settings.batching.batch_window = 0.01
    settings.batching.idle_timeout = 5.0
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.scanning.disabled = True
    settings.peering.standalone = not SETTINGS.peering
    settings.execution.max_workers = 4
    # Transient errors (connection refused, 5xx, 429) are retried with the shared backoff; what kopf
    # still gives up on ends its run, and main.py starts it again. kopf must not SIGKILL the process
    # when a run ends with an error: that would take the reconciler's memory with it.
    settings.networking.error_backoffs = RETRY.delays(8)
    settings.watching.reconnect_backoff = 1.0
    settings.process.ultimate_exiting_timeout = None
    return settings


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf connects with the same credentials as our client, loaded afresh at every (re-)login: kopf
    logs in again on a 401, which picks up a rotated service-account token."""
    cfg = load_configuration(SETTINGS.kubeconfig)
    return kopf.ConnectionInfo(
        server=cfg.host,
        ca_path=cfg.ssl_ca_cert,
        insecure=not cfg.verify_ssl,
        certificate_path=cfg.cert_file,
        private_key_path=cfg.key_file,
        token=bearer_token(cfg),
        default_namespace=None,
    )


@kopf.on.startup()
async def startup(memo: kopf.Memo, retry: int, **_: Any) -> None:
    reconciler = memo.get("reconciler")
    if reconciler is None:
        api = KubeClient(load_configuration(SETTINGS.kubeconfig), user_agent="loraplane-operator")
        reconciler = memo["reconciler"] = Reconciler(SETTINGS, api)
    try:
        await reconciler.prime()
    except APIError as exc:
        if not exc.retry:
            raise
        # kopf's own default would wait a minute; the API server may be back in a second.
        raise kopf.TemporaryError(str(exc), delay=RETRY.delays(retry + 1)[-1]) from None
    memo["ticker"] = asyncio.get_running_loop().create_task(_ticker(reconciler, memo))
    if SETTINGS.bbr_namespace:  # body-based routing ConfigMaps: off unless asked for
        memo["bbr"] = bbr.Publisher(SETTINGS, reconciler)
        memo["bbr"].start()


async def _ticker(reconciler: Reconciler, memo: kopf.Memo) -> None:
    while True:
        await asyncio.sleep(SETTINGS.liveness_interval)
        try:
            if await reconciler.store_went_back():
                memo["restart"].set()  # main.py starts kopf again: it lists afresh.
                return
            with metrics.HANDLER_DURATION.labels(handler="tick").time():
                await reconciler.tick()
        except APIError as exc:  # The API server is away: the next tick tries again.
            log.warning("periodic check: %s", exc)
        except Exception:  # The ticker must survive any single failure; it is logged.
            log.exception("periodic check failed")


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    stopping = memo.get("stopping")
    if stopping is not None:
        stopping.set()  # main.py gives kopf a bounded time to finish stopping from now on
    restart = memo.get("restart")
    if restart is not None and not restart.is_set():
        # Stopped by a signal (or an error), not for a restart: release kopf's waiter on the stop flag,
        # which it would otherwise give 5 s as a hung task before exiting (issue 18: slow demo stops).
        memo["signalled"] = True
        restart.set()
    publisher = memo.get("bbr")
    if publisher is not None:
        await publisher.stop()
    task = memo.get("ticker")
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    reconciler = memo.get("reconciler")
    if reconciler is not None:
        await reconciler.api.close()


@kopf.on.event(GROUP, VERSION, ADAPTER_PLURAL)
async def adapter_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    with metrics.HANDLER_DURATION.labels(handler="adapter").time():
        await memo["reconciler"].on_adapter(event.get("type"), event["object"])
    if (publisher := memo.get("bbr")) is not None:
        publisher.adapter_changed()


@kopf.on.event(GROUP, VERSION, WORKER_PLURAL)
async def worker_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    with metrics.HANDLER_DURATION.labels(handler="worker").time():
        await memo["reconciler"].on_worker(event.get("type"), event["object"])
    if (publisher := memo.get("bbr")) is not None:
        publisher.worker_changed((event["object"].get("spec") or {}).get("baseModel"))
