"""The operator's check that the API server's store went back, made to race with its own writes.

Issue 18: under ID stress on kube-apiserver three operator replicas logged 14 false "resourceVersion X is
below Y ... its store was replaced" and restarted kopf. The check reads the collection's resourceVersion
(`GET ?limit=1`) while handlers keep raising the highest version seen; an answer that arrives after a
write's answer is older than that write. Here a proxy in front of the API server (the local one, or a
real cluster with --kubeconfig) holds the check's answer until a write has been made and seen.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web
from kubernetes import client

from loraplane.kube import KubeClient
from loraplane.operator.reconciler import Reconciler
from loraplane.operator.settings import OperatorSettings

ADAPTERS = "/apis/loraplane.io/v1alpha1/namespaces/{ns}/loraadapters"


class SlowChecks:
    """An HTTP proxy to the API server (authenticating as the kubeconfig does) that holds the answer to
    every `GET ...?limit=1` until ``release`` is set; ``answered`` is set once the server has answered."""

    def __init__(self, kube: Any) -> None:
        self.kube, self.http = kube, kube.http()
        self.answered, self.release = asyncio.Event(), asyncio.Event()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() in ("content-type", "accept")}
        resp = await asyncio.to_thread(
            self.http.request,
            request.method,
            self.kube.url + request.path_qs,
            data=body or None,
            headers=headers,
        )
        if request.method == "GET" and request.query.get("limit") == "1":
            self.answered.set()
            await self.release.wait()
        return web.Response(status=resp.status_code, body=resp.content, content_type="application/json")


def test_a_write_seen_while_the_check_is_in_flight_is_no_store_reset(kube: Any, namespace: str) -> None:
    kube.apply_crds()

    async def scenario() -> bool:
        proxy = SlowChecks(kube)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", proxy.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        cfg = client.Configuration()
        cfg.host = f"http://127.0.0.1:{port}"
        through_proxy, direct = KubeClient(cfg), KubeClient.from_kubeconfig(kube.kubeconfig)
        try:
            path = ADAPTERS.format(ns=namespace)
            adapter = {"apiVersion": "loraplane.io/v1alpha1", "kind": "LoRAAdapter", "metadata": {"name": "a"},
                       "spec": {"baseModel": "m", "path": "/models/a"}}  # fmt: skip
            await direct.request("POST", path, body=adapter)
            reconciler = Reconciler(OperatorSettings(namespaces=[namespace]), through_proxy)
            await reconciler.prime()
            check = asyncio.create_task(reconciler.store_went_back())
            await asyncio.wait_for(proxy.answered.wait(), 30)  # the server answered; the proxy holds it
            await direct.request(
                "PATCH", f"{path}/a", body={"metadata": {"labels": {"n": "1"}}},
                content_type="application/merge-patch+json",
            )  # fmt: skip
            await reconciler.prime()  # the operator sees the write (its handlers do, from kopf's events)
            proxy.release.set()
            return await asyncio.wait_for(check, 30)
        finally:
            proxy.release.set()
            await through_proxy.close()
            await direct.close()
            await runner.cleanup()

    assert asyncio.run(scenario()) is False  # the store did not go back: nothing to relist, no kopf restart
