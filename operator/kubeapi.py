"""A small asyncio client for the few API calls whose preconditions the operator controls itself.

kopf's own patches are merge patches without a resourceVersion check; the ID ledger and the adapter
status carrying an ID must be written with one, so they go through this client (aiohttp, credentials
taken from the kubeconfig by the official client's loader).
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import aiohttp

from loraplane.crds.errors import TemporaryError


class ApiError(Exception):
    """A non-2xx answer; ``status`` is the HTTP code, ``body`` the decoded Status object (or text)."""

    def __init__(self, status: int, body: Any) -> None:
        message = body.get("message", "") if isinstance(body, dict) else str(body)
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.body = body


class KubeApi:
    """Raw JSON requests against the API server named by a kubeconfig (or the in-cluster account)."""

    def __init__(self, kubeconfig: str | None = None) -> None:
        from kubernetes import client, config

        cfg = client.Configuration()
        try:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        except config.ConfigException:
            config.load_incluster_config(client_configuration=cfg)
        self._cfg = cfg
        self.host = cfg.host.rstrip("/")
        self.headers = {"Accept": "application/json"}
        token = cfg.get_api_key_with_prefix("authorization") or cfg.get_api_key_with_prefix("BearerToken")
        if token:
            self.headers["Authorization"] = token if " " in token else f"Bearer {token}"
        self._ssl: ssl.SSLContext | bool = False
        if self.host.startswith("https"):
            ctx = ssl.create_default_context(cafile=cfg.ssl_ca_cert) if cfg.verify_ssl else ssl.SSLContext()
            if not cfg.verify_ssl:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if cfg.cert_file:
                ctx.load_cert_chain(cfg.cert_file, cfg.key_file)
            self._ssl = ctx
        self._session: aiohttp.ClientSession | None = None
        self.writes = 0  # Count of write requests sent (for the benchmark's writes-per-ID figure).

    def connection_info(self) -> Any:
        """The same credentials as kopf's ConnectionInfo (for kopf's own watch)."""
        import kopf

        cfg = self._cfg
        token = self.headers.get("Authorization", "").removeprefix("Bearer ") or None
        return kopf.ConnectionInfo(
            server=self.host,
            ca_path=cfg.ssl_ca_cert,
            insecure=not cfg.verify_ssl,
            certificate_path=cfg.cert_file,
            private_key_path=cfg.key_file,
            token=token,
            default_namespace=None,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> Any:
        """Send one request; returns the decoded JSON; raises ApiError on HTTP errors, TemporaryError on I/O."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=30),
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=32),
            )
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if body is not None else {}
        if method != "GET":
            self.writes += 1
        try:
            async with self._session.request(method, self.host + path, data=data, headers=headers) as resp:
                text = await resp.text()
                try:
                    decoded = json.loads(text) if text else None
                except ValueError:
                    decoded = text
                if resp.status >= 400:
                    raise ApiError(resp.status, decoded)
                return decoded
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise TemporaryError("ApiUnreachable", f"{method} {path}: {exc!r}") from exc


def adapter_path(namespace: str, name: str = "", subresource: str = "") -> str:
    from loraplane.crds.models import ADAPTER_PLURAL, GROUP, VERSION

    path = f"/apis/{GROUP}/{VERSION}/namespaces/{namespace}/{ADAPTER_PLURAL}"
    if name:
        path += f"/{name}"
    if subresource:
        path += f"/{subresource}"
    return path
