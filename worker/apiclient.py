"""A small asyncio client for the few Kubernetes API calls the worker makes (list, watch, get, create, patch).

The worker's control path is one event loop; the official ``kubernetes`` client is synchronous, so it
is used only to load credentials (kubeconfig or in-cluster service account, including token refresh),
and requests go through aiohttp. Failures become ``ApiError`` with the HTTP status and the Kubernetes
Status reason, so callers branch on codes (404, 409, 410), never on message text.
"""

from __future__ import annotations

import json
import logging
import os
import ssl
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

log = logging.getLogger(__name__)

_MAX_EVENT_BYTES = 16 << 20  # one watch event (a whole object); Kubernetes caps objects at 1.5 MiB


class ApiError(Exception):
    """An API request failed: ``status`` is the HTTP code (0 when the server could not be reached)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"HTTP {status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message


class ApiClient:
    """Requests against one API server. Create it inside the running loop; ``close()`` when done."""

    def __init__(self, configuration: Any) -> None:
        self._cfg = configuration
        self.host = str(configuration.host).rstrip("/")
        ctx: ssl.SSLContext | bool = False
        if self.host.startswith("https://"):
            if configuration.verify_ssl:
                ctx = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
            else:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if configuration.cert_file:
                ctx.load_cert_chain(configuration.cert_file, configuration.key_file)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=ctx, limit=16),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30),
        )

    @classmethod
    def from_kubeconfig(cls, kubeconfig: str = "") -> ApiClient:
        """Credentials from ``kubeconfig``; empty: in-cluster service account, else KUBECONFIG/~/.kube/config."""
        return cls(load_configuration(kubeconfig))

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        hook = getattr(self._cfg, "refresh_api_key_hook", None)
        if hook is not None:
            hook(self._cfg)  # in-cluster tokens rotate; the loader's hook re-reads the file when due
        headers = {"Accept": "application/json", "User-Agent": "loraplane-worker"}
        # The loader puts the bearer token under a key that varies by client version ("BearerToken",
        # "authorization"); auth_settings() says which header carries it.
        for auth in self._cfg.auth_settings().values():
            if auth.get("in") == "header" and auth.get("value"):
                headers[str(auth["key"]).title()] = str(auth["value"])
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: dict[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """One request; returns the decoded JSON body or raises ApiError."""
        data = None if body is None else json.dumps(body).encode()
        try:
            async with self._session.request(
                method,
                self.host + path,
                params=params,
                data=data,
                headers=self._headers(content_type if data is not None else None),
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise _status_error(resp.status, text)
                return json.loads(text) if text else {}
        except (aiohttp.ClientError, OSError, TimeoutError) as e:
            raise ApiError(
                0, "Unreachable", f"cannot reach the API server at {self.host}: {type(e).__name__}: {e}"
            ) from e

    async def watch(
        self, path: str, *, resource_version: str, timeout_seconds: int = 300
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch events (``{"type", "object"}``) from ``resource_version``; ends when the server closes it.

        An HTTP 410 raises ApiError(410); the in-stream ERROR event is yielded as is for the caller.
        """
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        try:
            async with self._session.get(
                self.host + path,
                params=params,
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=timeout_seconds + 30),
            ) as resp:
                if resp.status >= 400:
                    raise _status_error(resp.status, await resp.text())
                buffer = b""
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        if line.strip():
                            yield json.loads(line)
                    if len(buffer) > _MAX_EVENT_BYTES:
                        raise ApiError(
                            0, "EventTooLarge", f"a watch event from {path} exceeds {_MAX_EVENT_BYTES} bytes"
                        )
                if buffer.strip():
                    yield json.loads(buffer)
        except (aiohttp.ClientError, OSError, TimeoutError, json.JSONDecodeError) as e:
            raise ApiError(0, "Unreachable", f"watch of {path} broke: {type(e).__name__}: {e}") from e

    async def close(self) -> None:
        await self._session.close()


def load_configuration(kubeconfig: str = "") -> Any:
    """A kubernetes.client.Configuration from ``kubeconfig``; empty: the in-cluster service account when
    running in a Pod, else KUBECONFIG / ~/.kube/config. Raises ApiError(0, "NoCredentials") naming the fix."""
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        if kubeconfig:
            config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=cfg)
        else:
            config.load_kube_config(client_configuration=cfg)
    except (config.ConfigException, OSError, TypeError, ValueError) as e:
        where = kubeconfig or "in-cluster / KUBECONFIG / ~/.kube/config"
        raise ApiError(0, "NoCredentials", f"cannot load Kubernetes credentials from {where}: {e}") from None
    return cfg


def _status_error(status: int, text: str) -> ApiError:
    try:
        body = json.loads(text)
        return ApiError(status, str(body.get("reason", "")), str(body.get("message", text))[:500])
    except (ValueError, AttributeError):
        return ApiError(status, "", text[:500])
