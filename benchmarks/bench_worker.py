"""Apply-to-Ready latency of one worker: 50 local adapters, one at a time and all at once.

Runs the local API server (in its own process, so it does not share our GIL), the operator and one
worker (subprocesses) with a config-only tiny base model and small PEFT-format adapters under a local
root. For each adapter it measures, from sending the create:
  - apply-to-ID: the operator's status.id seen on a watch of LoRAAdapters;
  - apply-to-Ready: the adapter Ready in the worker's LoRAWorker report, seen on a watch of LoRAWorkers
    (so it includes the ID, the worker's watch, resolve, prefetch into the cache, validate, the
    batched report write and the watch back);
and prints p50/p99 of both, side by side, and the worker's share (Ready minus ID) for
  - sequential: each adapter applied after the previous one is Ready (an idle worker's latency);
  - burst: all adapters applied at once (a GitOps sync), target p99 <= 1 s.

    python benchmarks/bench_worker.py            # 50 adapters
    python benchmarks/bench_worker.py --n 20
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from loraplane.crds import ranges

REPO = Path(__file__).resolve().parent.parent
GROUP, VERSION = "loraplane.io", "v1alpha1"
BASE = "tiny-llama"


def _serve(conn: Any) -> None:
    from loraplane.localkube import LocalKube

    server = LocalKube()
    conn.send(server.start())
    threading.Event().wait()


def adapters_module() -> Any:
    spec = importlib.util.spec_from_file_location("adapters", REPO / "tests" / "support" / "adapters.py")
    mod = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class Watcher:
    """Two watches (adapters for IDs, workers for Ready) recording first-seen times by adapter name."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        self.api_client, self.ns = api_client, namespace
        self.id_at: dict[str, float] = {}
        self.ready_at: dict[str, float] = {}
        self.names: dict[int, str] = {}
        self.stop = threading.Event()
        self.cond = threading.Condition()
        for target in (self._adapters, self._workers):
            threading.Thread(target=target, daemon=True).start()

    def _stream(self, plural: str) -> Any:
        from kubernetes import client, watch

        api = client.CustomObjectsApi(self.api_client)
        while not self.stop.is_set():
            w = watch.Watch()
            for ev in w.stream(
                api.list_namespaced_custom_object, GROUP, VERSION, self.ns, plural, timeout_seconds=30
            ):
                yield ev["object"]
                if self.stop.is_set():
                    w.stop()
                    return

    def _adapters(self) -> None:
        for obj in self._stream("loraadapters"):
            now = time.monotonic()
            adapter_id = (obj.get("status") or {}).get("id")
            name = obj["metadata"]["name"]
            if adapter_id:
                with self.cond:
                    self.names[adapter_id] = name
                    self.id_at.setdefault(name, now)
                    self.cond.notify_all()

    def _workers(self) -> None:
        for obj in self._stream("loraworkers"):
            now = time.monotonic()
            with self.cond:
                # The report lists Ready adapters as ID ranges (crds/ranges.py); names come from the IDs.
                for adapter_id in ranges.from_blocks((obj.get("status") or {}).get("readyIds")):
                    name = self.names.get(adapter_id)
                    if name is not None:
                        self.ready_at.setdefault(name, now)
                self.cond.notify_all()

    def wait_ready(self, names: list[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while not all(n in self.ready_at for n in names):
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [n for n in names if n not in self.ready_at]
                    raise SystemExit(f"timed out: {len(missing)} adapters not Ready, e.g. {missing[:3]}")
                self.cond.wait(left)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=50, help="adapters per round")
    args = parser.parse_args(argv)

    from kubernetes import client

    from loraplane.localkube import write_kubeconfig

    tmp = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(child,), daemon=True)
    server.start()
    url = parent.recv()
    kubeconfig = str(write_kubeconfig(url, tmp / "kubeconfig"))
    sys.path.insert(0, str(REPO / "tests"))
    from support import kube as kubeclient  # tests/support/kube.py: apply_crds without kubectl

    kube = kubeclient.Kube(kubeconfig, url, True)
    kube.apply_crds()
    ns = "bench"
    with kube.api_client() as api:
        client.CoreV1Api(api).create_namespace({"metadata": {"name": ns}})

    adapters = adapters_module()
    base = adapters.write_base_config(tmp / "base")
    root = tmp / "adapters"
    print(f"writing {2 * args.n} adapters (rank 8, q/v of 2 layers) under {root} ...", flush=True)
    for i in range(2 * args.n):
        adapters.write_adapter(root / f"a{i:03d}", seed=i)

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    logs = {name: open(tmp / f"{name}.log", "ab") for name in ("operator", "worker")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "loraplane.operator.main", "--kubeconfig", kubeconfig, "--namespace", ns,
             "--ledger-namespace", ns, "--metrics-port", "0"],
            stdout=logs["operator"], stderr=subprocess.STDOUT, env=env,
        ),
        subprocess.Popen(
            [sys.executable, "-m", "loraplane.worker.main", "--kubeconfig", kubeconfig, "--base-model", str(base),
             "--served-model-name", BASE, "--cache-dir", str(tmp / "cache"), "--local-roots", str(root),
             "--worker-name", "w1", "--pod-namespace", ns, "--host", "127.0.0.1", "--port", str(free_port()),
             "--log-level", "WARNING", "--mode", "control"],
            stdout=logs["worker"], stderr=subprocess.STDOUT, env=env,
        ),
    ]  # fmt: skip
    api_client = kube.api_client()
    co = client.CustomObjectsApi(api_client)
    watcher = Watcher(kube.api_client(), ns)
    sent: dict[str, float] = {}

    def apply(i: int) -> str:
        name = f"a{i:03d}"
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "LoRAAdapter",
            "metadata": {"name": name},
            "spec": {"baseModel": BASE, "path": str(root / name)},
        }
        sent[name] = time.monotonic()
        co.create_namespaced_custom_object(GROUP, VERSION, ns, "loraadapters", body)
        return name

    try:
        time.sleep(2.0)  # let the operator and the worker start (not measured)
        print(f"sequential: {args.n} adapters, each applied after the previous one is Ready ...", flush=True)
        seq = []
        for i in range(args.n):
            seq.append(apply(i))
            watcher.wait_ready([seq[-1]], 60)
        print(f"burst: {args.n} adapters applied at once (8 client threads) ...", flush=True)
        with ThreadPoolExecutor(8) as pool:
            burst = list(pool.map(apply, range(args.n, 2 * args.n)))
        watcher.wait_ready(burst, 120)
    finally:
        watcher.stop.set()
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        server.terminate()

    print()
    print(
        f"{'round':<11}{'apply->ID p50':>15}{'p99':>8}{'apply->Ready p50':>19}{'p99':>8}{'worker share p50':>19}"
    )
    for label, names in (("sequential", seq), ("burst", burst)):
        to_id = [watcher.id_at[n] - sent[n] for n in names]
        to_ready = [watcher.ready_at[n] - sent[n] for n in names]
        share = [r / max(r, 1e-9) - i / max(r, 1e-9) for i, r in zip(to_id, to_ready, strict=True)]
        print(
            f"{label:<11}{_pct(to_id, 0.5):>14.3f}s{_pct(to_id, 0.99):>7.3f}s"
            f"{_pct(to_ready, 0.5):>18.3f}s{_pct(to_ready, 0.99):>7.3f}s{statistics.median(share):>18.0%}"
        )
    worst = max(watcher.ready_at[n] - sent[n] for n in burst)
    p99 = _pct([watcher.ready_at[n] - sent[n] for n in burst], 0.99)
    print(
        f"\nburst apply->Ready p99 {p99:.3f}s (target <= 1 s): {'met' if p99 <= 1.0 else 'NOT met'}; worst {worst:.3f}s"
    )
    print(f"(n={args.n} per round; logs in {tmp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
