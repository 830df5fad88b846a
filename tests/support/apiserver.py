"""A local API server that tests stop and start again on the same port, as an API server restarts.

RestartableKube.restart(empty=False)  keeps the store across the restart (kube-apiserver keeps etcd)
RestartableKube.restart(empty=True)   comes back with a new, empty store (etcd lost or restored from
                                      an old backup): no CRDs, no namespaces, resourceVersions from 1
restartable_kube(tmp_path)            a Kube for one test on its own server, CRDs applied
"""

from __future__ import annotations

from pathlib import Path

from aiohttp import web

from loraplane.localkube import LocalKube, write_kubeconfig
from loraplane.localkube.http import make_app
from support.kube import Kube


class RestartableKube(LocalKube):
    async def _serve(self) -> str:
        if self.state is None:
            url = await super()._serve()
            self.port = int(url.rsplit(":", 1)[1])
            return url
        self._runner = web.AppRunner(make_app(self.state), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port, shutdown_timeout=0.5).start()
        return f"http://{self.host}:{self.port}"

    def restart(self, *, empty: bool = False) -> None:
        self.stop()
        if empty:
            self.state = None
        self.start()


def restartable_kube(tmp_path: Path) -> Kube:
    server = RestartableKube()
    url = server.start()
    kube = Kube(str(write_kubeconfig(url, tmp_path / "kubeconfig")), url, True, server)
    kube.apply_crds()
    return kube


def create_namespace(kube: Kube, name: str) -> None:
    """A namespace with a given name (a new empty server lacks the test's namespace)."""
    from kubernetes import client

    with kube.api_client() as api:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})


def bump_resource_version(kube: Kube, namespace: str, adapter: str, writes: int = 30) -> None:
    """Advance the resourceVersion that watchers of LoRAAdapters have seen (label changes on one
    adapter), so it is above what a new empty server reaches in a test's few writes."""
    from kubernetes import client

    with kube.api_client() as api:
        co = client.CustomObjectsApi(api)
        for i in range(writes):
            body = {"metadata": {"labels": {"bump": str(i)}}}
            co.patch_namespaced_custom_object(
                "loraplane.io", "v1alpha1", namespace, "loraadapters", adapter, body
            )
