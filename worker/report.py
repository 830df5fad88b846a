"""The worker's own LoRAWorker object: its capacity in spec, its adapters' states in status.

Created at start (ownerReference to the worker's Pod when the Pod exists, so it is garbage-collected
with it). Adapter state changes are coalesced over a short interval into one status write, so API
writes grow with workers, not with workers x adapters; a heartbeat rewrites the status periodically
so the operator can tell a live worker from a dead one. Writes only this one object, never
LoRAAdapter objects. If the object disappears (deleted by hand, its Pod recreated), it is recreated.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import Callable
from typing import Any

from prometheus_client import Counter

from loraplane.crds.errors import APIConflictError, APIError, APINotFoundError
from loraplane.crds.kube import Backoff, KubeClient
from loraplane.crds.models import (
    API_VERSION,
    WORKER_KIND,
    WORKER_PLURAL,
    LoRAWorkerSpec,
    LoRAWorkerStatus,
    WorkerAdapterReport,
)

log = logging.getLogger(__name__)

STATUS_WRITES = Counter("loraplane_worker_report_writes", "LoRAWorker status writes (batches and heartbeats)")
SETTLE_FRACTION = 0.25  # of the batch interval: the wait before writing a change after a quiet spell
DEVICE_POLL_SECONDS = 1.0  # how often the engine's device slots are compared with the last report
MAX_STATUS_BYTES = 1 << 20  # bytes of status JSON; Kubernetes stores objects up to about 1.5 MiB


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class WorkerReport:
    """Owns one LoRAWorker object. ``mark_dirty()`` after changes; ``run()`` writes in batches.

    ``adapters`` returns the per-adapter reports; ``on_device`` (optional, from the engine) returns the
    IDs in device slots now; ``cache_bytes_used`` the cache's bytes in use.
    """

    def __init__(
        self,
        api: KubeClient,
        *,
        name: str,
        namespace: str,
        spec: LoRAWorkerSpec,
        adapters: Callable[[], list[WorkerAdapterReport]],
        cache_bytes_used: Callable[[], int] = lambda: 0,
        on_device: Callable[[], set[int]] | None = None,
        pod_name: str = "",
        batch_seconds: float = 0.2,
        heartbeat_seconds: float = 10.0,
    ) -> None:
        self.api = api
        self.name, self.namespace = name, namespace
        self.spec = spec
        self.adapters = adapters
        self.cache_bytes_used = cache_bytes_used
        self.on_device = on_device
        self.pod_name = pod_name
        self.batch_seconds = batch_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.writes = 0  # status writes done (tests check batching with it)
        self._dirty = asyncio.Event()
        self._reported_device: set[int] = set()  # the device slots in the last status written
        self._created = False
        self._trimmed = False  # warned once that the report is too large for details
        self._owned = False  # the object had an ownerReference to our Pod
        self.pod_gone = False  # the Pod was deleted: this worker is going away; stop reporting

    @property
    def path(self) -> str:
        return f"/apis/{API_VERSION}/namespaces/{self.namespace}/{WORKER_PLURAL}/{self.name}"

    def mark_dirty(self) -> None:
        self._dirty.set()

    # --- the object ------------------------------------------------------------------------------
    async def _owner_references(self) -> list[dict[str, Any]] | None:
        if not self.pod_name:
            return None
        try:
            pod = await self.api.request("GET", f"/api/v1/namespaces/{self.namespace}/pods/{self.pod_name}")
        except APIError as e:
            if e.status in (403, 404):
                # No Pod (a local run) or no permission to read it: the heartbeat window covers it.
                log.info(
                    "pod %s/%s not readable (%s); LoRAWorker has no owner", self.namespace, self.pod_name, e
                )
                return None
            raise
        meta = pod.get("metadata") or {}
        return [
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta.get("name", self.pod_name),
                "uid": meta.get("uid", ""),
                "blockOwnerDeletion": False,
                "controller": False,
            }
        ]

    async def ensure_object(self) -> None:
        """Create this worker's LoRAWorker, or update the spec and owner of the one already there."""
        owners = await self._owner_references()
        body: dict[str, Any] = {
            "apiVersion": API_VERSION,
            "kind": WORKER_KIND,
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {"loraplane.io/base-model": _label(self.spec.baseModel)},
            },
            "spec": self.spec.model_dump(exclude_none=True),
        }
        if owners:
            body["metadata"]["ownerReferences"] = owners
        self._owned = bool(owners)
        base = f"/apis/{API_VERSION}/namespaces/{self.namespace}/{WORKER_PLURAL}"
        try:
            await self.api.request("POST", base, body=body)
        except APIConflictError:  # it exists already (AlreadyExists): take it over
            patch = {
                "metadata": {"labels": body["metadata"]["labels"], "ownerReferences": owners},
                "spec": body["spec"],
            }
            await self.api.request(
                "PATCH", self.path, body=patch, content_type="application/merge-patch+json"
            )
        self._created = True
        log.info("LoRAWorker %s/%s ready to report", self.namespace, self.name)

    def status(self) -> LoRAWorkerStatus:
        reports = self.adapters()
        device = self.on_device() if self.on_device is not None else set()
        self._reported_device = device
        if device:
            reports = [r.model_copy(update={"onDevice": r.id in device}) for r in reports]
        return LoRAWorkerStatus(
            heartbeatTime=now(),
            ready=sum(r.state == "Ready" for r in reports),
            failed=sum(r.state == "Failed" for r in reports),
            onDevice=sum(r.onDevice for r in reports),
            cacheBytesUsed=self.cache_bytes_used(),
            adapters=reports,
        )

    def status_body(self) -> dict[str, Any]:
        """The status as written, kept under MAX_STATUS_BYTES: Kubernetes refuses objects over ~1.5 MiB,
        so with thousands of adapters the per-adapter details (info, long messages) go first; the
        states, which the operator counts, always stay."""
        status = self.status().model_dump(exclude_none=True)
        if len(json.dumps(status)) <= MAX_STATUS_BYTES:
            return status
        for rep in status.get("adapters") or []:
            rep.pop("info", None)
            if rep.get("message"):
                rep["message"] = rep["message"][:160]
        if not self._trimmed:
            log.warning(
                "LoRAWorker status over %d bytes with %d adapters: adapter details left out of the report",
                MAX_STATUS_BYTES,
                len(status.get("adapters") or []),
            )
            self._trimmed = True
        return status

    async def write_status(self) -> None:
        """One status write of the whole current state (a merge patch replaces the adapters list)."""
        body = {"status": self.status_body()}
        try:
            await self.api.request(
                "PATCH", self.path + "/status", body=body, content_type="application/merge-patch+json"
            )
        except APINotFoundError:
            if self._owned and await self._owner_references() is None:
                # Our Pod is gone and the garbage collector took our report with it: recreating it
                # would only leave an orphan behind; the Pod's deletion will stop this process.
                log.warning("pod %s/%s is gone; no longer reporting", self.namespace, self.pod_name)
                self.pod_gone = True
                return
            log.warning("LoRAWorker %s/%s is gone; recreating it", self.namespace, self.name)
            await self.ensure_object()
            await self.api.request(
                "PATCH", self.path + "/status", body=body, content_type="application/merge-patch+json"
            )
        self.writes += 1
        STATUS_WRITES.inc()

    async def delete(self) -> None:
        """Remove the object on a clean shutdown, so the operator stops counting this worker at once."""
        if self.pod_gone:
            return
        try:
            await self.api.request("DELETE", self.path, timeout=5)
        except APINotFoundError:
            pass
        except APIError as e:
            log.warning("could not delete LoRAWorker %s/%s: %s", self.namespace, self.name, e)

    async def _changed_before_heartbeat(self) -> bool:
        """Wait for mark_dirty() or for the engine's device slots to move (the engine swaps slots on
        its own thread, so they are polled); False when the heartbeat is due first."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.heartbeat_seconds
        while (left := deadline - loop.time()) > 0:
            try:
                await asyncio.wait_for(self._dirty.wait(), timeout=min(left, DEVICE_POLL_SECONDS))
                return True
            except TimeoutError:
                if self.on_device is not None and self.on_device() != self._reported_device:
                    return True
        return False

    # --- the loop --------------------------------------------------------------------------------
    async def run(self) -> None:
        """Create the object, then write status on changes (batched) and on every heartbeat."""
        backoff = Backoff()
        loop = asyncio.get_running_loop()
        last_write = -self.batch_seconds
        while not self.pod_gone:
            try:
                if not self._created:
                    await self.ensure_object()
                self._dirty.clear()
                await self.write_status()
                last_write = loop.time()
                backoff.reset()
            except APIError as e:
                wait = backoff.next()
                log.warning(
                    "LoRAWorker %s/%s write failed (%s); retrying in %.1fs",
                    self.namespace,
                    self.name,
                    e,
                    wait,
                )
                await asyncio.sleep(wait)
                continue
            if not await self._changed_before_heartbeat():
                continue  # heartbeat
            # At most one write per batch interval. A change after a quiet spell is written after a
            # short settle (a small local adapter goes Pending -> Ready within it: one write, not two);
            # a burst of changes is coalesced into the write at the end of the interval.
            settle = self.batch_seconds * SETTLE_FRACTION
            await asyncio.sleep(max(settle, last_write + self.batch_seconds - loop.time()))
        await asyncio.Event().wait()  # nothing more to report; wait to be stopped


def _label(value: str) -> str:
    """A label-safe form of a base model name (labels allow [A-Za-z0-9._-], at most 63 characters)."""
    out = "".join(c if c.isalnum() or c in "._-" else "_" for c in value)[-63:].strip("._-")
    return out or "unknown"
