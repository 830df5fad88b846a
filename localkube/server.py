"""Running the local API server: in-process (a thread with its own loop) for tests, or as a command.

`LocalKube().start()` serves on 127.0.0.1 with an ephemeral port and returns the URL; `stop()` ends it.
`main()` serves on a given port and writes a kubeconfig so a person can point kubectl at it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from aiohttp import web

from loraplane.localkube.cluster import Cluster
from loraplane.localkube.http import ApiState, AuditEntry, make_app

T = TypeVar("T")


def write_kubeconfig(
    url: str, path: str | Path, token: str | None = None, context: str = "localkube"
) -> Path:
    """Write a kubeconfig with one cluster/user/context pointing at `url` (no TLS; optional bearer token)."""
    user: dict[str, Any] = {"token": token} if token else {}
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": context, "cluster": {"server": url}}],
        "users": [{"name": context, "user": user}],
        "contexts": [
            {"name": context, "context": {"cluster": context, "user": context, "namespace": "default"}}
        ],
        "current-context": context,
        "preferences": {},
    }
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(config, sort_keys=False))
    return p


class LocalKube:
    """The server in a background thread. `tokens` maps bearer tokens to user names (for audit).

    authorization: "AlwaysAllow" (every request is allowed) or "RBAC" (the stored Roles and bindings
    decide, as kube-apiserver's --authorization-mode=RBAC; requests without credentials are admin)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        tokens: dict[str, str] | None = None,
        history: int | None = None,
        authorization: str = "AlwaysAllow",
    ) -> None:
        if authorization not in ("AlwaysAllow", "RBAC"):
            raise ValueError(f"authorization must be AlwaysAllow or RBAC, not {authorization!r}")
        self.host, self.port = host, port
        self.tokens = tokens
        self.authorization = authorization
        self.history = history
        self.url = ""
        self.state: ApiState | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def cluster(self) -> Cluster:
        assert self.state is not None, "start() the server first"
        return self.state.cluster

    @property
    def audit_log(self) -> list[AuditEntry]:
        """Every request seen: user, verb, apiGroup, resource, subresource, namespace, name, code."""
        assert self.state is not None, "start() the server first"
        return self.state.audit_log

    def start(self) -> str:
        ready: concurrent.futures.Future[str] = concurrent.futures.Future()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="localkube", daemon=True)
        self._thread.start()
        self.url = ready.result(timeout=30)
        return self.url

    def _run(self, ready: concurrent.futures.Future[str]) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        try:
            url = loop.run_until_complete(self._serve())
        except BaseException as e:
            ready.set_exception(e)
            return
        ready.set_result(url)
        loop.run_forever()
        loop.run_until_complete(self._shutdown())
        loop.close()

    async def _serve(self) -> str:
        self.state = ApiState(Cluster(self.history), tokens=self.tokens, authorization=self.authorization)
        self._runner = web.AppRunner(make_app(self.state), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, shutdown_timeout=0.5)
        await site.start()
        sockets = site._server.sockets if site._server else []  # type: ignore[union-attr]
        port = sockets[0].getsockname()[1]
        return f"http://{self.host}:{port}"

    async def _shutdown(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def call(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run fn on the server's loop (the store is not thread-safe) and return its result."""
        assert self._loop is not None

        async def wrapper() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(wrapper(), self._loop).result(timeout)

    def add_token(self, token: str, user: str) -> None:
        """Accept `Authorization: Bearer <token>` as `user` (recorded in audit_log; authorized by RBAC
        when the server runs with authorization="RBAC").

        Requests without credentials stay allowed as "admin"; an unknown token gets 401 once any is added.
        """
        assert self.state is not None, "start() the server first"
        if self.state.tokens is None:
            self.state.tokens = {}
        self.state.tokens[token] = user

    def set_history_window(self, n: int) -> None:
        """Keep only the last n events: older watch/list RVs get 410 Gone."""
        self.call(lambda: self.cluster.store.set_history_limit(n))

    def stop(self) -> None:
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._loop = None

    def __enter__(self) -> LocalKube:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """`loraplane dev-apiserver`: serve until interrupted and write a kubeconfig for kubectl."""
    parser = argparse.ArgumentParser(prog="loraplane dev-apiserver", description=__doc__)
    parser.add_argument("--port", type=int, default=8001, help="TCP port on 127.0.0.1 (0: any free port)")
    parser.add_argument("--kubeconfig", default="localkube.kubeconfig", help="where to write the kubeconfig")
    args = parser.parse_args(argv)
    server = LocalKube(port=args.port)
    url = server.start()
    path = write_kubeconfig(url, args.kubeconfig)
    print(f"localkube serving on {url}; kubeconfig written to {path}", flush=True)
    print(f"  export KUBECONFIG={path.resolve()}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0
