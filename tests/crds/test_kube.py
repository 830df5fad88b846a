"""The shared Kubernetes client against the API server fixture: one error class per status, keeping the
server's Status; the in-cluster service-account token re-read when it rotates; watch ERROR events as
errors; the server's resourceVersion compared for a store that went back in time."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import pytest

from loraplane import errors
from loraplane.kube import KubeClient, load_configuration, rv_behind


def _run(coro):
    return asyncio.run(coro)


def test_status_errors_keep_the_kubernetes_status(kube, namespace) -> None:
    async def go() -> None:
        api = KubeClient(load_configuration(kube.kubeconfig))
        try:
            path = f"/api/v1/namespaces/{namespace}/configmaps"
            body = {"metadata": {"name": "cm"}, "data": {"a": "1"}}
            created = await api.request("POST", path, body=body)
            with pytest.raises(errors.APIConflictError) as e:
                await api.request("POST", path, body=body)
            assert e.value.status == 409 and e.value.reason == "AlreadyExists" and e.value.retry
            assert '"cm" already exists' in e.value.message and e.value.details.get("name") == "cm"
            stale = {**created, "data": {"a": "2"}}
            await api.request("PUT", f"{path}/cm", body={**created, "data": {"a": "3"}})
            with pytest.raises(errors.APIConflictError) as e:
                await api.request("PUT", f"{path}/cm", body=stale)  # The resourceVersion read is stale.
            assert e.value.reason == "Conflict"
            with pytest.raises(errors.APINotFoundError) as e:
                await api.request("GET", f"{path}/missing")
            assert e.value.status == 404 and e.value.reason == "NotFound" and not e.value.retry
            assert api.writes == 4
        finally:
            await api.close()

    _run(go())


@pytest.mark.usefixtures("local_only")
def test_watch_from_a_compacted_version_raises_gone(kube, namespace) -> None:
    async def go() -> None:
        api = KubeClient(load_configuration(kube.kubeconfig))
        path = f"/api/v1/namespaces/{namespace}/configmaps"
        try:
            first = await api.resource_version(path)
            for i in range(5):
                await api.request("POST", path, body={"metadata": {"name": f"c{i}"}})
            kube.server.set_history_window(2)
            with pytest.raises(errors.APIGoneError) as e:
                async for _ in api.watch(path, resource_version=first, timeout_seconds=5):
                    pass
            assert e.value.status == 410 and e.value.reason == "Expired" and e.value.retry
        finally:
            kube.server.set_history_window(10000)
            await api.close()

    _run(go())


@pytest.mark.usefixtures("local_only")
def test_rotated_service_account_token_is_read_again(kube, tmp_path) -> None:
    """In a Pod the token file is replaced about hourly and the old token stops working: every request
    must use the current file (the operator used to read it once)."""
    from kubernetes import client
    from kubernetes.config.incluster_config import InClusterConfigLoader

    old, new = uuid.uuid4().hex, uuid.uuid4().hex
    kube.server.add_token(old, "system:serviceaccount:loraplane-system:operator")
    token_file, ca_file = tmp_path / "token", tmp_path / "ca.crt"
    token_file.write_text(old)
    ca_file.write_text("unused: the test server speaks plain HTTP")
    host, port = kube.url.removeprefix("http://").rsplit(":", 1)
    loader = InClusterConfigLoader(
        token_filename=str(token_file),
        cert_filename=str(ca_file),
        environ={"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port},
    )
    loader._token_refresh_period = dt.timedelta(0)  # The kubelet's rotation, without waiting an hour.
    cfg = client.Configuration()
    loader.load_and_set(cfg)
    cfg.host = kube.url  # The loader names https://host:port; the test server is plain HTTP.

    async def go() -> None:
        api = KubeClient(cfg)
        try:
            await api.request("GET", "/api/v1/namespaces")
            token_file.write_text(new)
            kube.server.add_token(new, "system:serviceaccount:loraplane-system:operator")
            kube.server.state.tokens.pop(old)  # The old token has expired.
            await api.request("GET", "/api/v1/namespaces")
        finally:
            await api.close()

    try:
        _run(go())
    finally:
        kube.server.state.tokens.pop(new, None)
        kube.server.state.tokens.pop(old, None)


def test_missing_kubeconfig_names_what_was_tried(tmp_path) -> None:
    with pytest.raises(errors.CredentialsError) as e:
        load_configuration(str(tmp_path / "nonexistent"))
    assert e.value.reason == "NoCredentials" and str(tmp_path / "nonexistent") in e.value.message


@pytest.mark.parametrize(
    ("current", "seen", "behind"),
    [("5", "9", True), ("9", "9", False), ("12", "9", False), ("5", None, False), ("abc", "9", False)],
)
def test_rv_behind(current, seen, behind) -> None:
    assert rv_behind(current, seen) is behind
