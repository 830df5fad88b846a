"""Thin kopf handlers: every decision lives in reconciler.py, allocation.py, names.py and aggregate.py.

Only ``kopf.on.event`` handlers are used: they keep no progress, diff-base or finalizer on the objects,
so kopf itself writes nothing to adapters (every write is the operator's own checked status write).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import kopf

from loraplane.crds.models import ADAPTER_PLURAL, GROUP, VERSION, WORKER_PLURAL
from loraplane.operator import metrics
from loraplane.operator.kubeapi import KubeApi
from loraplane.operator.reconciler import Reconciler
from loraplane.operator.settings import OperatorSettings

log = logging.getLogger("loraplane.operator")

SETTINGS = OperatorSettings()  # Set by main() before kopf starts.


@kopf.on.login()
def login(**_: Any) -> kopf.ConnectionInfo:
    """kopf connects with the same credentials as our own client (a token-less kubeconfig included)."""
    return KubeApi(SETTINGS.kubeconfig).connection_info()


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Fewer writes and less latency: no progress annotations, kopf's own Events only for errors,
    # a short batching window (each event is handled at once).
    settings.persistence.progress_storage = kopf.StatusProgressStorage(field="status.kopf")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="loraplane.io")
    settings.posting.level = logging.ERROR
    settings.batching.batch_window = 0.01
    settings.batching.idle_timeout = 30.0
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.scanning.disabled = True
    settings.peering.standalone = not SETTINGS.peering
    settings.execution.max_workers = 4
    api = KubeApi(SETTINGS.kubeconfig)
    reconciler = Reconciler(SETTINGS, api)
    await reconciler.prime()
    memo["reconciler"] = reconciler
    memo["ticker"] = asyncio.get_running_loop().create_task(_ticker(reconciler))


async def _ticker(reconciler: Reconciler) -> None:
    while True:
        await asyncio.sleep(SETTINGS.liveness_interval)
        try:
            with metrics.HANDLER_DURATION.labels(handler="tick").time():
                await reconciler.tick()
        except Exception:  # The ticker must survive any single failure; it is logged.
            log.exception("periodic check failed")


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
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


@kopf.on.event(GROUP, VERSION, WORKER_PLURAL)
async def worker_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    with metrics.HANDLER_DURATION.labels(handler="worker").time():
        await memo["reconciler"].on_worker(event.get("type"), event["object"])
