"""Several operator processes with no leader election: IDs stay unique, also across a SIGKILL."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from loraplane.crds.models import ADAPTER_PLURAL, GROUP, VERSION

BASE = "meta-llama/Llama-2-7b-hf"
N = 300
CLIENTS = 6


class Recorder:
    """Records every watch event of the namespace's adapters: (uid, status.version, status.id)."""

    def __init__(self, kube: Any, namespace: str) -> None:
        self.kube, self.namespace = kube, namespace
        self.seen: list[tuple[str, str | None, int | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Recorder:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(15)

    def _run(self) -> None:
        from kubernetes import client, watch

        with self.kube.api_client() as api:
            co = client.CustomObjectsApi(api)
            rv = co.list_namespaced_custom_object(GROUP, VERSION, self.namespace, ADAPTER_PLURAL)["metadata"][
                "resourceVersion"
            ]
            while not self._stop.is_set():
                w = watch.Watch()
                for ev in w.stream(
                    co.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    ADAPTER_PLURAL,
                    resource_version=rv,
                    timeout_seconds=2,
                    _request_timeout=10,
                ):
                    obj = ev["object"]
                    rv = obj["metadata"]["resourceVersion"]
                    st = obj.get("status") or {}
                    self.seen.append((obj["metadata"]["uid"], st.get("version"), st.get("id")))

    def check(self) -> None:
        by_version: dict[tuple[str, str | None], set[int]] = {}
        by_id: dict[int, set[tuple[str, str | None]]] = {}
        for uid, version, id_ in self.seen:
            if id_ is None:
                continue
            by_version.setdefault((uid, version), set()).add(id_)
            by_id.setdefault(id_, set()).add((uid, version))
        twice = {k: v for k, v in by_version.items() if len(v) > 1}
        shared = {k: v for k, v in by_id.items() if len(v) > 1}
        assert not twice, f"one adapter version seen with two IDs: {twice}"
        assert not shared, f"one ID seen on two adapter versions: {shared}"
        assert len(by_id) >= N, f"the watch saw only {len(by_id)} IDs"


def _create_all(kube: Any, namespace: str, on_progress: Any = None) -> None:
    from kubernetes import client

    done = [0]
    lock = threading.Lock()

    def create(chunk: range) -> None:
        with kube.api_client() as api:
            co = client.CustomObjectsApi(api)
            for i in chunk:
                body = {
                    "apiVersion": f"{GROUP}/{VERSION}",
                    "kind": "LoRAAdapter",
                    "metadata": {"name": f"a{i}"},
                    "spec": {"baseModel": BASE, "path": f"/models/a{i}"},
                }
                co.create_namespaced_custom_object(GROUP, VERSION, namespace, ADAPTER_PLURAL, body)
                with lock:
                    done[0] += 1
                    if on_progress:
                        on_progress(done[0])

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(create, [range(c, N, CLIENTS) for c in range(CLIENTS)]))


def _all_ids(adapters: Any, namespace: str, wait: Any) -> list[int]:
    def ids() -> list[int] | None:
        found = [(a.get("status") or {}).get("id") for a in adapters.list(namespace)]
        return found if len(found) == N and all(found) else None

    return wait(ids, 90, f"{N} adapters with IDs", interval=0.5)


def test_three_operators_assign_unique_ids(kube, adapters, operators, namespace, scope, wait) -> None:
    ops = [operators(*scope(namespace), "--block-size", "16") for _ in range(3)]
    with Recorder(kube, namespace) as rec:
        _create_all(kube, namespace)
        ids = _all_ids(adapters, namespace, wait)
        time.sleep(1)  # Let late duplicate attempts (there must be none) reach the watch.
    assert len(set(ids)) == N and min(ids) > 0
    rec.check()
    assert all(op.proc.poll() is None for op in ops)


def test_sigkill_mid_run_keeps_ids_unique(kube, adapters, operators, namespace, scope, wait) -> None:
    args = [*scope(namespace), "--block-size", "16"]
    ops = [operators(*args) for _ in range(3)]
    killed = threading.Event()

    def progress(n: int) -> None:
        if n >= N // 3 and not killed.is_set():
            killed.set()
            ops[0].kill()

    with Recorder(kube, namespace) as rec:
        _create_all(kube, namespace, progress)
        assert killed.is_set()
        operators(*args)  # The restart.
        ids = _all_ids(adapters, namespace, wait)
        time.sleep(1)
    assert len(set(ids)) == N and min(ids) > 0
    rec.check()
