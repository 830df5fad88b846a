"""Placement (issue 21): N adapters with replicas k on W control-mode workers, then one killed, one added.

On a fresh API server (the embedded one in its own process, or a fresh namespace of a real cluster
with --kubeconfig) it starts the operator and W workers (``--mode control``: watch, prefetch,
validate, report), creates N distinct local adapters with ``spec.replicas: k``, and waits until every
one is Ready on k workers (status.ready "k/k"). It prints:

- per worker, the adapters placed on it (status.placement) and what it holds Ready (its LoRAWorker),
  against the target N x k / W +-20%;
- downloads in total (the workers' cache misses), against N x k; without placement every worker
  fetches every adapter: N x W;
- assignments moved when one worker is killed (SIGKILL: its heartbeat stops), against
  1.5 x N x k / W, and the time until every adapter is Ready on k live workers again (it includes
  the operator's --heartbeat-window, after which a silent worker stops counting);
- assignments moved when a worker is added, against 1.5 x N x k / (W + 1).

    python benchmarks/bench_placement.py                         # W=8, N=2000, k=2
    python benchmarks/bench_placement.py --workers 4 --n 100     # small
    python benchmarks/bench_placement.py --kubeconfig ~/.kube/config
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# The API server, the adapters and the processes, as bench_scale.py has them (benchmarks/ is on sys.path).
from bench_scale import BASE, GROUP, VERSION, Cluster, operator_proc, worker_proc, write_adapters
from bench_worker import adapters_module

Placements = dict[str, tuple[str, ...]]  # adapter name -> worker refs


class Fleet:
    """The operator and the workers of one run (tests/support/procs.py), their logs in ``logs``."""

    def __init__(self, args: argparse.Namespace, cluster: Cluster, base: Path, root: Path, tmp: Path):
        self.args, self.cluster, self.base, self.root = args, cluster, base, root
        self.logs = tmp / "logs"
        self.logs.mkdir(exist_ok=True)
        self.procs: dict[str, Any] = {}

    def operator(self) -> None:
        self.procs["operator"] = operator_proc(
            self.cluster, self.logs / "operator.log", self.args.heartbeat_window, "--liveness-interval", "1"
        ).start()

    def worker(self, name: str) -> None:
        """Start (again: the same cache) the worker ``name``."""
        self.procs[name] = worker_proc(
            self.cluster, self.logs, name, self.base, self.root, "--heartbeat-seconds", "2"
        ).start()

    def downloads(self, name: str) -> int:
        """The worker's cache misses (prefetches that fetched the files); -1 when it does not answer."""
        metrics = self.procs[name].metrics()
        return int(metrics.get("loraplane_worker_cache_misses_total", 0)) if metrics else -1

    def kill(self, name: str) -> None:
        self.procs[name].kill()

    def stop(self) -> None:
        for p in self.procs.values():
            p.stop()


def _list(co: Any, ns: str, plural: str) -> list[dict[str, Any]]:
    items, cont = [], None
    while True:
        body = co.list_namespaced_custom_object(GROUP, VERSION, ns, plural, limit=500, _continue=cont)
        items += body["items"]
        cont = body["metadata"].get("continue")
        if not cont:
            return items


def snapshot(co: Any, ns: str, k: int) -> tuple[Placements, int]:
    """Every adapter's placement, and how many are Ready on k workers (status.ready "k/k")."""
    placed, ready = {}, 0
    for obj in _list(co, ns, "loraadapters"):
        status = obj.get("status") or {}
        placed[obj["metadata"]["name"]] = tuple(sorted((status.get("placement") or {}).get("workers") or ()))
        ready += status.get("ready") == f"{k}/{k}"
    return placed, ready


def wait_settled(
    co: Any, ns: str, n: int, k: int, timeout: float, avoid: str | None = None
) -> tuple[Placements, bool]:
    """Wait until all ``n`` adapters are Ready on k workers (none on ``avoid``) and placements hold still."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        placed, ready = snapshot(co, ns, k)
        done = len(placed) == n and ready == n and not any(avoid in p for p in placed.values() if avoid)
        if done and placed == last:
            return placed, True
        last = placed if done else None
        time.sleep(1.0)
    return snapshot(co, ns, k)[0], False


def wait_ready(co: Any, ns: str, n: int, k: int, timeout: float, avoid: str) -> float | None:
    """Seconds until every adapter is Ready on k workers, none of them ``avoid`` (None: timed out)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        placed, ready = snapshot(co, ns, k)
        if ready == n and not any(avoid in p for p in placed.values()):
            return time.monotonic() - t0
        time.sleep(0.5)
    return None


def moved(before: Placements, after: Placements) -> int:
    """Assignments (adapter, worker) that are new in ``after``."""
    return sum(len(set(after[a]) - set(before.get(a, ()))) for a in after)


def per_worker(placed: Placements) -> dict[str, int]:
    counts: dict[str, int] = {}
    for workers in placed.values():
        for w in workers:
            counts[w] = counts.get(w, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2000, help="adapters")
    parser.add_argument("--workers", type=int, default=8, help="control-mode workers (W)")
    parser.add_argument("--replicas", type=int, default=2, help="spec.replicas of every adapter (k)")
    parser.add_argument("--heartbeat-window", type=float, default=10.0, help="the operator's, seconds")
    parser.add_argument("--kubeconfig", default=None, help="a real cluster instead of the embedded server")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per phase before giving up")
    args = parser.parse_args(argv)
    n, w, k = args.n, args.workers, args.replicas
    tmp = Path(tempfile.mkdtemp(prefix="bench-placement-"))
    adapters = adapters_module()
    base = adapters.write_base_config(tmp / "base")
    root = tmp / "adapters"
    print(f"writing {n} adapters under {root} ...", flush=True)
    write_adapters(root, n)
    cluster = Cluster(args.kubeconfig, tmp, "placement")
    co, ns = cluster.co, cluster.ns
    fleet = Fleet(args, cluster, base, root, tmp)
    names = [f"w{i}" for i in range(w)]
    ok = True
    try:
        fleet.operator()
        for name in names:
            fleet.worker(name)
        deadline = time.monotonic() + 120
        while len(_list(co, ns, "loraworkers")) < w:
            if time.monotonic() > deadline:
                raise SystemExit(f"workers did not start; logs in {fleet.logs}")
            time.sleep(0.5)
        time.sleep(2.0)  # the operator sees every worker live before the first adapter

        def create(i: int) -> None:
            body = {
                "apiVersion": f"{GROUP}/{VERSION}", "kind": "LoRAAdapter", "metadata": {"name": f"a{i:05d}"},
                "spec": {"baseModel": BASE, "path": str(root / f"a{i:05d}"), "replicas": k},
            }  # fmt: skip
            co.create_namespaced_custom_object(GROUP, VERSION, ns, "loraadapters", body)

        print(f"N={n} adapters, replicas k={k}, W={w} control-mode workers ...", flush=True)
        t0 = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(n)))
        placed, ok = wait_settled(co, ns, n, k, args.timeout)
        print(f"all {n} Ready on {k} workers in {time.monotonic() - t0:.1f}s" if ok else "NOT all Ready")
        target = n * k / w
        counts = per_worker(placed)
        held = {
            o["metadata"]["name"]: (o.get("status") or {}).get("ready", 0)
            for o in _list(co, ns, "loraworkers")
        }
        print(
            f"\nper worker: placed (status.placement) / Ready on it (its LoRAWorker), target {target:.0f} +-20%"
        )
        worst = 0.0
        for name in names:
            c = counts.get(f"{ns}/{name}", 0)
            worst = max(worst, abs(c - target) / target)
            print(f"  {name:<4} {c:>6} {held.get(name, 0):>6}  {100 * (c - target) / target:+6.1f}%")
        print(f"largest deviation {100 * worst:.1f}% (target <= 20%): {'met' if worst <= 0.2 else 'NOT met'}")
        downloads = {name: fleet.downloads(name) for name in names}
        total = sum(downloads.values())
        print(
            f"downloads in total {total} (target N x k = {n * k}: {'met' if total == n * k else 'NOT met'}; "
            f"every adapter on every worker would be N x W = {n * w}, x{n * w / max(total, 1):.1f})"
        )

        victim = names[-1]
        print(
            f"\nkilling {victim} (SIGKILL; the operator's heartbeat window is {args.heartbeat_window:.0f}s) ..."
        )
        fleet.kill(victim)
        recover = wait_ready(co, ns, n, k, args.timeout, f"{ns}/{victim}")
        after_kill, settled = wait_settled(co, ns, n, k, args.timeout, avoid=f"{ns}/{victim}")
        ok &= settled and recover is not None
        lost = counts.get(f"{ns}/{victim}", 0)
        bound = 1.5 * n * k / w
        m = moved(placed, after_kill)
        print(f"assignments moved on kill {m} (its own {lost}; target <= 1.5 x N x k / W = {bound:.0f}): "
              f"{'met' if m <= bound else 'NOT met'}")  # fmt: skip
        if recover is not None:
            print(
                f"every adapter back to {k} Ready {recover:.1f}s after the kill "
                f"(heartbeat window {args.heartbeat_window:.0f}s + {recover - args.heartbeat_window:.1f}s)"
            )
        else:
            print(f"NOT back to {k} Ready within {args.timeout:.0f}s")

        print(f"\n{victim} comes back (same name, its cache kept) ...")
        fleet.worker(victim)
        back, settled = wait_settled(co, ns, n, k, args.timeout)
        deadline = time.monotonic() + 120
        while per_worker(back).get(f"{ns}/{victim}", 0) < lost and time.monotonic() < deadline:
            time.sleep(1.0)
            back, settled = wait_settled(co, ns, n, k, args.timeout)
        ok &= settled
        m = moved(after_kill, back)
        me = f"{ns}/{victim}"
        onto = sum(me in back[a] and me not in after_kill[a] for a in back)
        again = sum(me in back[a] for a in placed if me in placed[a])
        print(
            f"assignments moved on its return {m}, onto {victim}: {onto} (target: its own {lost} and no other); "
            f"it holds again {again} of the {lost} it had (the rest rank it below their current workers: "
            "the bounded load had put them on it)"
        )
        before_add = {name: fleet.downloads(name) for name in names}

        newcomer = f"w{w}"
        print(f"\nadding {newcomer} ...")
        fleet.worker(newcomer)
        deadline = time.monotonic() + 120
        while not any(f"{ns}/{newcomer}" in p for p in snapshot(co, ns, k)[0].values()):
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
        after_add, settled = wait_settled(co, ns, n, k, args.timeout)
        ok &= settled
        m = moved(back, after_add)
        bound = 1.5 * n * k / (w + 1)
        onto = per_worker(after_add).get(f"{ns}/{newcomer}", 0)
        print(
            f"assignments moved on add {m} (all onto {newcomer}: {onto}; "
            f"target <= 1.5 x N x k / (W + 1) = {bound:.0f}): {'met' if m <= bound else 'NOT met'}"
        )
        extra = sum(fleet.downloads(name) - before_add[name] for name in names) + fleet.downloads(newcomer)
        print(f"downloads for the add {extra} (the newcomer's share; the others fetch nothing)")
        counts = per_worker(after_add)
        print(
            "per worker after the add: "
            + ", ".join(f"{x.split('/')[-1]} {c}" for x, c in sorted(counts.items()))
        )
    finally:
        fleet.stop()
        cluster.close()
    print(f"(logs in {fleet.logs})")
    shutil.rmtree(root, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
