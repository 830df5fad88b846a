"""Scale: the cost of one adapter must not grow with the number of adapters (issue 20).

For each point N adapters x W control-mode workers, on a fresh API server (the embedded one in its
own process, or a fresh namespace of a real cluster with --kubeconfig), it starts the operator and W
workers (``--mode control``: watch, prefetch, validate, report), creates N distinct local adapters
8 at a time, and waits until every adapter has an ID and is Ready (phase Ready in its status). It
prints per point: time to all IDs and to all Ready, CPU ms per adapter of each process (the API
server's only when it is ours), peak RSS of each process, API writes per adapter (the advance of the
API server's resourceVersion, which every write moves: creates, status writes, Events, the ledger,
worker reports; on a real cluster also its own background writes), API writes per second, and the
largest object. Then the ratios between the largest and the smallest N, which should stay near 1
for CPU per adapter, and the memory per adapter (the slope of peak RSS between those two points).

    python benchmarks/bench_scale.py                               # 500, 3000, 10000 x 1 worker
    python benchmarks/bench_scale.py --points 500:1,2000:1,2000:8  # W=8 at N=2000
    python benchmarks/bench_scale.py --points 200:1,1000:1 --kubeconfig ~/.kube/config
    python benchmarks/bench_scale.py --points 500:4,10000:4 --replicas 2 --delete  # placement at N, 20N
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

# tests/support/adapters.py, as bench_worker.py finds it (benchmarks/ is on sys.path).
from bench_worker import adapters_module

REPO = Path(__file__).resolve().parent.parent
GROUP, VERSION = "loraplane.io", "v1alpha1"
BASE = "tiny-llama"
DISTINCT_WEIGHTS = 64  # different weight files; the rest are hard links (every adapter has its own path)


WRITE_VERBS = ("create", "update", "patch", "delete")


def _serve(conn: Any) -> None:
    """The embedded API server in this process; answers ("writes", namespace or None) with its write
    requests by kind ("loraadapters/status update"), counted as they come (its audit log is cut at
    100,000 requests)."""
    from loraplane.localkube import LocalKube

    counts: dict[tuple[str, str], int] = {}

    class Counted(list):  # type: ignore[type-arg]
        def append(self, e: Any) -> None:
            if e.verb in WRITE_VERBS:
                key = (e.namespace, f"{e.resource}{'/' + e.subresource if e.subresource else ''} {e.verb}")
                counts[key] = counts.get(key, 0) + 1
            super().append(e)

    server = LocalKube()
    url = server.start()
    assert server.state is not None
    server.state.audit_log = Counted()
    conn.send(url)
    while (ask := conn.recv())[0] == "writes":
        out: dict[str, int] = {}
        for (ns, kind), c in list(counts.items()):
            if ask[1] is None or ns == ask[1]:
                out[kind] = out.get(kind, 0) + c
        conn.send(out)


class Cluster:
    """The API server of one run and a fresh namespace in it: the embedded server in its own process
    (``pid``; ``writes()`` counts its write requests), or the real cluster of ``kubeconfig``."""

    def __init__(self, kubeconfig: str | None, tmp: Path, prefix: str) -> None:
        from kubernetes import client

        sys.path.insert(0, str(REPO / "tests"))
        from support import kube as kubeclient  # tests/support/kube.py: apply_crds without kubectl

        self.server: Any = None
        if kubeconfig:
            self.kubeconfig, url, local = kubeconfig, "", False
        else:
            from loraplane.localkube import write_kubeconfig

            ctx = multiprocessing.get_context("spawn")
            self._conn, child = ctx.Pipe()
            self.server = ctx.Process(target=_serve, args=(child,), daemon=True)
            self.server.start()
            url = self._conn.recv()
            self.kubeconfig, local = str(write_kubeconfig(url, tmp / f"kubeconfig-{prefix}")), True
        self.kube = kubeclient.Kube(self.kubeconfig, url, local)
        self.kube.apply_crds()
        self.ns = f"{prefix}-{uuid.uuid4().hex[:6]}"
        self.api_client = self.kube.api_client()
        self.co = client.CustomObjectsApi(self.api_client)
        self.core = client.CoreV1Api(self.api_client)
        self.core.create_namespace({"metadata": {"name": self.ns}})

    @property
    def pid(self) -> int | None:
        return self.server.pid if self.server is not None else None

    def writes(self, namespace: str | None = None) -> dict[str, int]:
        """Write requests so far by kind, in ``namespace`` or all; empty on a real cluster."""
        if self.server is None:
            return {}
        self._conn.send(("writes", namespace))
        return self._conn.recv()

    def close(self) -> None:
        if self.server is not None:
            self._conn.send(("stop", None))
            self.server.terminate()
            self.server.join(10)
        else:
            self.core.delete_namespace(self.ns)
        self.api_client.close()


def operator_proc(cluster: Cluster, log: Path, heartbeat_window: float, *args: str) -> Any:
    """The operator, as the tests start it (tests/support/procs.py), scoped to the run's namespace."""
    from support.procs import OperatorProc

    return OperatorProc(cluster.kubeconfig, cluster.ns, log, heartbeat_window=heartbeat_window, args=args)


def worker_proc(cluster: Cluster, workdir: Path, name: str, base: Path, root: Path, *args: str) -> Any:
    """A control-mode worker, as the tests start it, with the worker's own defaults for what the tests
    shorten (heartbeat, report batch, cache budget) unless ``args`` say otherwise."""
    from support.procs import WorkerProc

    defaults = ["--log-level", "WARNING", "--heartbeat-seconds", "10", "--report-batch-seconds", "0.2"]
    defaults += ["--cache-bytes", str(20 << 30)]
    return WorkerProc(
        cluster.kubeconfig, workdir, name=name, namespace=cluster.ns, base_dir=base, local_root=root,
        extra=[*defaults, *args],
    )  # fmt: skip


def write_adapters(root: Path, n: int) -> None:
    adapters = adapters_module()
    for i in range(n):
        out = root / f"a{i:05d}"
        if out.exists():
            continue
        if i < DISTINCT_WEIGHTS:
            adapters.write_adapter(out, seed=i)
        else:
            out.mkdir(parents=True)
            src = root / f"a{i % DISTINCT_WEIGHTS:05d}"
            for f in src.iterdir():
                os.link(f, out / f.name)


class Progress:
    """A watch of LoRAAdapters: when each got its ID and when each turned Ready."""

    def __init__(self, api_client: Any, namespace: str) -> None:
        self.api_client, self.ns = api_client, namespace
        self.id_at: dict[str, float] = {}
        self.ready_at: dict[str, float] = {}
        self.stop = threading.Event()
        self.cond = threading.Condition()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        from kubernetes import client, watch

        api = client.CustomObjectsApi(self.api_client)
        rv = None
        while not self.stop.is_set():
            w = watch.Watch()
            try:
                for ev in w.stream(
                    api.list_namespaced_custom_object, GROUP, VERSION, self.ns, "loraadapters",
                    timeout_seconds=60, resource_version=rv,
                ):  # fmt: skip
                    obj, now = ev["object"], time.monotonic()
                    rv = obj["metadata"].get("resourceVersion", rv)
                    status, name = obj.get("status") or {}, obj["metadata"]["name"]
                    with self.cond:
                        if status.get("id"):
                            self.id_at.setdefault(name, now)
                        if status.get("phase") == "Ready":
                            self.ready_at.setdefault(name, now)
                        self.cond.notify_all()
                    if self.stop.is_set():
                        w.stop()
                        return
            except Exception:  # a broken watch (410 Gone): list again
                rv = None

    def wait(self, what: dict[str, float], n: int, deadline: float) -> bool:
        with self.cond:
            while len(what) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 1.0))
        return True


@dataclass
class Result:
    n: int
    workers: int
    to_ids: float
    to_ready: float
    complete: bool
    cpu_ms: dict[str, float] = field(default_factory=dict)  # per adapter
    rss_mib: dict[str, float] = field(default_factory=dict)  # peak
    writes: int = 0
    largest: tuple[int, str] = (0, "")
    breakdown: dict[str, int] = field(default_factory=dict)  # write requests by kind (embedded server)
    delete_s: float = 0.0  # deleting all N until the operator is idle again
    delete_cpu_ms: float = 0.0  # the operator's CPU per adapter for that


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return t.user + t.system


def _peak_rss(p: psutil.Process) -> float:
    """Peak resident set (VmHWM) in MiB."""
    for line in Path(f"/proc/{p.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return p.memory_info().rss / 2**20


def _idle(p: psutil.Process, deadline: float, step: float = 2.0) -> None:
    """Wait until ``p`` spends under 5% of a core over ``step`` seconds (its backlog is done)."""
    last = _cpu(p)
    while time.monotonic() < deadline:
        time.sleep(step)
        now = _cpu(p)
        if now - last < 0.05 * step:
            return
        last = now


def _current_rv(co: Any, ns: str) -> int:
    body = co.list_namespaced_custom_object(GROUP, VERSION, ns, "loraadapters", limit=1)
    return int(body["metadata"]["resourceVersion"])


def _largest(co: Any, ns: str) -> tuple[int, str]:
    best = (0, "")
    for plural in ("loraworkers", "loraadapters"):
        cont = None
        while True:
            body = co.list_namespaced_custom_object(GROUP, VERSION, ns, plural, limit=500, _continue=cont)
            for obj in body["items"]:
                size = len(json.dumps(obj, separators=(",", ":")))
                best = max(best, (size, f"{plural}/{obj['metadata']['name']}"))
            cont = body["metadata"].get("continue")
            if not cont:
                break
    return best


def run_point(n: int, workers: int, args: argparse.Namespace, tmp: Path, root: Path, base: Path) -> Result:
    cluster = Cluster(args.kubeconfig, tmp, f"scale-{n}-{workers}")
    co, ns = cluster.co, cluster.ns
    procs: dict[str, psutil.Process] = {}
    if cluster.pid is not None:
        procs["apiserver"] = psutil.Process(cluster.pid)
    logs = tmp / f"logs-{n}-{workers}"
    logs.mkdir()
    # The operator's own defaults for what the tests shorten (liveness checks, the heartbeat window).
    children = [operator_proc(cluster, logs / "operator.log", 60.0, "--liveness-interval", "5").start()]
    procs["operator"] = psutil.Process(children[0].proc.pid)
    for w in range(workers):
        children.append(worker_proc(cluster, logs, f"w{w}", base, root).start())
        procs[f"worker-{w}"] = psutil.Process(children[-1].proc.pid)
    progress = Progress(cluster.kube.api_client(), ns)
    try:
        deadline = time.monotonic() + 60
        while len(co.list_namespaced_custom_object(GROUP, VERSION, ns, "loraworkers")["items"]) < workers:
            if time.monotonic() > deadline:
                raise SystemExit(f"workers did not start; logs in {logs}")
            time.sleep(0.5)
        time.sleep(2.0)  # the operator's start-up listing (not measured)
        cpu0 = {k: _cpu(p) for k, p in procs.items()}
        rv0 = _current_rv(co, ns)

        def create(i: int) -> None:
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "LoRAAdapter",
                "metadata": {"name": f"a{i:05d}"},
                "spec": {"baseModel": BASE, "path": str(root / f"a{i:05d}")},
            }
            if args.replicas is not None:
                body["spec"]["replicas"] = args.replicas
            co.create_namespaced_custom_object(GROUP, VERSION, ns, "loraadapters", body)

        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(n)))
        end = t0 + args.timeout
        got_ids = progress.wait(progress.id_at, n, end)
        to_ids = max(progress.id_at.values(), default=t0) - t0
        complete = got_ids and progress.wait(progress.ready_at, n, end)
        to_ready = (max(progress.ready_at.values(), default=t0) - t0) if complete else time.monotonic() - t0
        # Events are posted in the background after the status writes: count them once writes stop.
        settle, last = time.monotonic() + 300, -1
        while (rv := _current_rv(co, ns)) != last and time.monotonic() < settle:
            last = rv
            time.sleep(2.0)
        writes = rv - rv0
        cpu = {k: (_cpu(p) - cpu0[k]) * 1000 / n for k, p in procs.items()}
        rss = {k: _peak_rss(p) for k, p in procs.items()}
        largest = _largest(co, ns)
        breakdown = cluster.writes()
        if not complete:
            print(
                f"  N={n}: only {len(progress.ready_at)} of {n} Ready after {args.timeout:.0f}s", flush=True
            )
        delete_s = delete_cpu = 0.0
        if args.delete:  # every delete frees room on the adapter's workers: what does it cost the operator?
            op, d0 = procs["operator"], time.monotonic()
            c0 = _cpu(op)
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(lambda i: co.delete_namespaced_custom_object(
                    GROUP, VERSION, ns, "loraadapters", f"a{i:05d}"), range(n)))  # fmt: skip
            _idle(op, time.monotonic() + args.timeout)
            delete_s, delete_cpu = time.monotonic() - d0, (_cpu(op) - c0) * 1000 / n
    finally:
        progress.stop.set()
        for c in children:
            c.stop()
        cluster.close()
    worker_cpu = [v for k, v in cpu.items() if k.startswith("worker-")]
    worker_rss = [v for k, v in rss.items() if k.startswith("worker-")]
    cpu = {k: v for k, v in cpu.items() if not k.startswith("worker-")} | {"worker": max(worker_cpu)}
    rss = {k: v for k, v in rss.items() if not k.startswith("worker-")} | {"worker": max(worker_rss)}
    return Result(
        n, workers, to_ids, to_ready, complete, cpu, rss, writes, largest, breakdown, delete_s, delete_cpu
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--points", default="500:1,3000:1,10000:1", help="N:W pairs, comma-separated")
    parser.add_argument("--kubeconfig", default=None, help="a real cluster instead of the embedded server")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per point before giving up")
    parser.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="spec.replicas of every adapter (placement); default: unset",
    )
    parser.add_argument(
        "--delete", action="store_true", help="then delete all N and measure the operator's CPU for it"
    )
    args = parser.parse_args(argv)
    points = [tuple(int(x) for x in p.split(":")) for p in args.points.split(",")]

    tmp = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    adapters = adapters_module()
    base = adapters.write_base_config(tmp / "base")
    root = tmp / "adapters"
    top = max(n for n, _ in points)
    print(f"writing {top} adapters under {root} ...", flush=True)
    write_adapters(root, top)
    results = []
    for n, w in points:
        print(f"N={n} adapters, W={w} control-mode worker(s) ...", flush=True)
        results.append(run_point(n, w, args, tmp, root, base))

    procs = list(results[0].cpu_ms)
    print()
    head = f"{'N':>6} {'W':>2} {'all IDs':>8} {'all Ready':>10}  " + "  ".join(
        f"{'CPU ms/ad ' + p:>20}" for p in procs
    )
    head += "  " + "  ".join(f"{'peak RSS MiB ' + p:>22}" for p in procs)
    head += f"  {'writes/ad':>9} {'writes/s':>8}  largest object"
    print(head)
    for r in results:
        line = f"{r.n:>6} {r.workers:>2} {r.to_ids:>7.1f}s {r.to_ready:>9.1f}s" + ("" if r.complete else "!")
        line += "  " + "  ".join(f"{r.cpu_ms[p]:>20.2f}" for p in procs)
        line += "  " + "  ".join(f"{r.rss_mib[p]:>22.0f}" for p in procs)
        line += f"  {r.writes / r.n:>9.2f} {r.writes / max(r.to_ready, 1e-9):>8.0f}"
        line += f"  {r.largest[0] / 1024:.1f} KiB ({r.largest[1]})"
        print(line)
    for r in results:
        if r.breakdown:
            top = sorted(r.breakdown.items(), key=lambda kv: -kv[1])[:8]
            print(
                f"  N={r.n} W={r.workers} writes per adapter by kind: "
                + ", ".join(f"{k} {v / r.n:.2f}" for k, v in top)
            )
    singles = [r for r in results if r.workers == results[0].workers]
    lo, hi = min(singles, key=lambda r: r.n), max(singles, key=lambda r: r.n)
    if hi.n > lo.n:
        print(f"\nratios N={hi.n} / N={lo.n} (W={lo.workers}), target CPU ms per adapter within 1.5x:")
        for p in procs:
            ratio = hi.cpu_ms[p] / max(lo.cpu_ms[p], 1e-9)
            print(f"  CPU ms per adapter {p:<10} {ratio:5.2f}x  {'met' if ratio <= 1.5 else 'NOT met'}")
        print(f"  time to all Ready per adapter  {(hi.to_ready / hi.n) / (lo.to_ready / lo.n):5.2f}x")
        print(f"  API writes per adapter         {(hi.writes / hi.n) / (lo.writes / lo.n):5.2f}x")
        st = "loraadapters/status update"
        if lo.breakdown.get(st) and hi.breakdown.get(st):
            ratio = (hi.breakdown[st] / hi.n) / (lo.breakdown[st] / lo.n)
            print(f"  status writes per adapter      {ratio:5.2f}x")
        if args.delete:
            ratio = hi.delete_cpu_ms / max(lo.delete_cpu_ms, 1e-9)
            print(
                f"  delete all: operator CPU ms per adapter {lo.delete_cpu_ms:.2f} vs {hi.delete_cpu_ms:.2f}, "
                f"{ratio:5.2f}x  {'met' if ratio <= 1.5 else 'NOT met'}; "
                f"{lo.delete_s:.1f}s vs {hi.delete_s:.1f}s to idle"
            )
        print("memory per adapter (peak RSS slope between those points):")
        for p in procs:
            kib = (hi.rss_mib[p] - lo.rss_mib[p]) * 1024 / (hi.n - lo.n)
            print(f"  {p:<10} {kib:6.1f} KiB per adapter")
        ready_ok = hi.complete and hi.to_ready <= 180
        print(
            f"all Ready at N={hi.n} in {hi.to_ready:.0f}s (target <= 180 s): {'met' if ready_ok else 'NOT met'}"
        )
    by_n: dict[int, list[Result]] = {}
    for r in results:
        by_n.setdefault(r.n, []).append(r)
    for n, rs in by_n.items():
        if len(rs) > 1:
            a, b = min(rs, key=lambda r: r.workers), max(rs, key=lambda r: r.workers)
            rate = (b.writes / b.to_ready) / max(a.writes / a.to_ready, 1e-9)
            print(
                f"N={n}: W={b.workers} vs W={a.workers}: API writes per adapter {b.writes / n:.2f} vs "
                f"{a.writes / n:.2f}, writes/s x{rate:.2f} (W x N would be x{b.workers / a.workers:.0f} per adapter)"
            )
    print(f"(logs in {tmp})")
    shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
