"""The one Kubernetes API client of the operator and the worker: raw JSON over aiohttp.

Why our own and not a library: the operator and the worker make a dozen kinds of call (list, watch,
get, create, a resourceVersion-checked PUT, merge patches) on objects they validate with the pydantic
models in this package; an aiohttp client of this size does that with one error hierarchy
(``errors.API*Error``, one class per status, keeping the Kubernetes Status) and one retry policy
(``Backoff``). The official ``kubernetes`` package (already a dependency) only loads credentials:
kubeconfig (exec plugins and OIDC included) or the in-cluster service account. Its refresh hook is
called before every request, so a projected service-account token that rotates (about hourly on a
real cluster) is re-read, and so are expiring exec-plugin tokens.
"""

from __future__ import annotations

import json
import os
import random
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from loraplane import errors

MAX_EVENT_BYTES = 16 << 20  # one watch event (a whole object); Kubernetes caps objects at 1.5 MiB
_ERROR_TEXT = 500  # characters of a non-Status error body kept in messages

_BY_STATUS: dict[int, type[errors.APIError]] = {
    401: errors.APIUnauthorizedError,
    403: errors.APIForbiddenError,
    404: errors.APINotFoundError,
    409: errors.APIConflictError,
    410: errors.APIGoneError,
    422: errors.APIUnprocessableEntityError,
    429: errors.APITooManyRequestsError,
}


def status_error(status: int, body: Any) -> errors.APIError:
    """The error class for an HTTP status, keeping the Status object's reason, message and details."""
    if isinstance(body, str):
        try:
            body = json.loads(body)
        except ValueError:
            body = {"message": body[:_ERROR_TEXT]}
    if not isinstance(body, dict):
        body = {}
    details = body.get("details") if isinstance(body.get("details"), dict) else {}
    causes = {c.get("reason") for c in details.get("causes") or [] if isinstance(c, dict)}
    cls = _BY_STATUS.get(status)
    if cls is None:
        if status == 504 and "ResourceVersionTooLarge" in causes:
            cls = errors.APIResourceVersionTooLargeError
        elif 400 <= status < 500:
            cls = errors.APIClientError
        elif status >= 500:
            cls = errors.APIServerError
        else:
            cls = errors.APIError
    message = str(body.get("message") or f"HTTP {status}").strip()[: _ERROR_TEXT * 8]
    return cls(status, str(body.get("reason") or ""), message, details)


@dataclass
class Backoff:
    """The one retry policy against the API: capped exponential delays with jitter (a fleet of workers
    must not reconnect in step when the API server returns). ``next()`` gives the next delay."""

    start: float = 0.2
    """Seconds before the first retry."""
    cap: float = 10.0
    """Seconds: the longest wait, so a returning API server is noticed within it."""
    _delay: float = field(default=0.0, init=False)

    def next(self) -> float:
        self._delay = self.start if self._delay == 0 else min(self._delay * 2, self.cap)
        return self._delay * (0.5 + random.random())

    def reset(self) -> None:
        self._delay = 0.0

    def delays(self, count: int) -> list[float]:
        """The first ``count`` delays without jitter (for kopf's ``networking.error_backoffs``)."""
        return [min(self.start * 2**i, self.cap) for i in range(count)]


def load_configuration(kubeconfig: str | None = None) -> Any:
    """A ``kubernetes.client.Configuration`` from ``kubeconfig``; none given: the in-cluster service
    account when running in a Pod, else $KUBECONFIG / ~/.kube/config. Raises CredentialsError naming
    what was tried."""
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
        where = kubeconfig or "the in-cluster service account, $KUBECONFIG or ~/.kube/config"
        raise errors.CredentialsError(
            0, "", f"cannot load Kubernetes credentials from {where}: {e}"
        ) from None
    return cfg


def bearer_token(cfg: Any) -> str | None:
    """The bearer token the configuration holds now (after its refresh hook), without "Bearer "."""
    hook = getattr(cfg, "refresh_api_key_hook", None)
    if hook is not None:
        hook(cfg)  # in-cluster tokens rotate; the loader's hook re-reads the file when due
    # The loader keeps the token under a key that varies by client version ("BearerToken",
    # "authorization"); auth_settings() says which header carries it.
    for auth in cfg.auth_settings().values():
        if (
            auth.get("in") == "header"
            and str(auth.get("key")).lower() == "authorization"
            and auth.get("value")
        ):
            value = str(auth["value"])
            return value.split(" ", 1)[1] if value.lower().startswith("bearer ") else value
    return None


class KubeClient:
    """Requests against one API server, with the credentials of a ``kubernetes`` Configuration.

    Create it anywhere; the HTTP session opens with the first request (inside the running loop).
    ``close()`` when done. ``writes`` counts non-GET requests (the benchmarks' writes-per-ID figure).
    """

    def __init__(self, configuration: Any, *, user_agent: str = "loraplane") -> None:
        self.configuration = configuration
        self.host = str(configuration.host).rstrip("/")
        self.user_agent = user_agent
        self._ssl: ssl.SSLContext | bool = False
        if self.host.startswith("https://"):
            if configuration.verify_ssl:
                ctx = ssl.create_default_context(cafile=configuration.ssl_ca_cert)
            else:
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            if configuration.cert_file:
                ctx.load_cert_chain(configuration.cert_file, configuration.key_file)
            self._ssl = ctx
        self._session: aiohttp.ClientSession | None = None
        self.writes = 0

    @classmethod
    def from_kubeconfig(cls, kubeconfig: str | None = None, *, user_agent: str = "loraplane") -> KubeClient:
        return cls(load_configuration(kubeconfig), user_agent=user_agent)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=32),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=30),
            )
        return self._session

    def _headers(self, content_type: str | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": self.user_agent}
        token = bearer_token(self.configuration)
        if token:
            headers["Authorization"] = f"Bearer {token}"
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
        """One request; the decoded JSON body, or an ``APIError`` subclass for the status."""
        data = None if body is None else json.dumps(body).encode()
        if method != "GET":
            self.writes += 1
        try:
            async with self.session.request(
                method,
                self.host + path,
                params=params,
                data=data,
                headers=self._headers(content_type if data is not None else None),
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                text = await resp.text()
                if resp.status >= 400:
                    raise status_error(resp.status, text)
                return json.loads(text) if text else {}
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            raise errors.APIUnreachableError(
                0, "", f"{method} {path}: cannot reach the API server at {self.host}: {type(e).__name__}: {e}"
            ) from e

    async def watch(
        self, path: str, *, resource_version: str, timeout_seconds: int = 300
    ) -> AsyncIterator[dict[str, Any]]:
        """Watch events (``{"type", "object"}``, bookmarks included) from ``resource_version``, until the
        server ends the watch. An ERROR event raises its status's error (410: ``APIGoneError``)."""
        params = {
            "watch": "1",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        try:
            async with self.session.get(
                self.host + path,
                params=params,
                headers=self._headers(),
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=timeout_seconds + 30),
            ) as resp:
                if resp.status >= 400:
                    raise status_error(resp.status, await resp.text())
                buffer = b""
                async for chunk in resp.content.iter_any():
                    buffer += chunk
                    while b"\n" in buffer:
                        line, buffer = buffer.split(b"\n", 1)
                        if line.strip():
                            yield _event(line)
                    if len(buffer) > MAX_EVENT_BYTES:
                        raise errors.APIUnreachableError(
                            0, "EventTooLarge", f"a watch event from {path} exceeds {MAX_EVENT_BYTES} bytes"
                        )
                if buffer.strip():
                    yield _event(buffer)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            raise errors.APIUnreachableError(0, "", f"watch of {path} broke: {type(e).__name__}: {e}") from e

    async def resource_version(self, path: str) -> str:
        """The collection's current resourceVersion (a one-item list, read from the store)."""
        body = await self.request("GET", path, params={"limit": "1"})
        return str((body.get("metadata") or {}).get("resourceVersion", ""))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _event(line: bytes) -> dict[str, Any]:
    event = json.loads(line)
    if event.get("type") == "ERROR":
        status = event.get("object") or {}
        raise status_error(int(status.get("code") or 500), status)
    return event


def rv_behind(current: str, seen: str | None) -> bool:
    """True when the server's ``current`` resourceVersion is below one we ``seen`` from it: its store
    was restored or replaced (an empty restarted API server, an etcd restore), so resuming a watch from
    ``seen`` would wait for versions it never issues. resourceVersions are opaque by contract; every
    server we know issues increasing integers, and anything else compares as not behind."""
    try:
        return seen is not None and int(current) < int(seen)
    except ValueError:
        return False
