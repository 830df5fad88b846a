"""Body-based-routing ConfigMaps: what a burst of adapters costs in ConfigMap writes, and the recompute.

A real operator (``--bbr-namespace``) runs against the embedded API server (in its own process, its
audit log counting writes by kind). N adapters of two base models are created as fast as one client
can, then a tenth of them renamed, then all deleted; for each phase it prints the ConfigMap writes
(against the N an operator writing per adapter would make) and the seconds until the ConfigMaps say
what the adapters say. Then the operator's in-memory side (``bbr.Routes``) at N and 20N: building the map
from scratch, and a flush after a batch of renames, per adapter: it should stay flat.

    python benchmarks/bench_bbr.py --n 2000
    python benchmarks/bench_bbr.py --n 10000 --max-bytes 100000   # splits each base model's ConfigMap
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

# The embedded API server, its write counts and the operator, as bench_scale.py has them (benchmarks/ is
# on sys.path).
from bench_scale import Cluster, operator_proc

GROUP, VERSION = "loraplane.io", "v1alpha1"
BASES = ("meta-llama/Llama-2-7b-hf", "Qwen/Qwen2-7B-Instruct")
BBR = "inference.networking.k8s.io/bbr-managed=true"


def routes(core: Any, ns: str) -> tuple[dict[str, str], int]:
    out: dict[str, str] = {}
    items = core.list_namespaced_config_map(ns, label_selector=BBR).items
    for cm in items:
        for name in yaml.safe_load(cm.data.get("adapters") or "[]") or []:
            out[name] = cm.data["baseModel"]
    return out, len(items)


def wait_until(pred: Any, timeout: float) -> float:
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise SystemExit(f"timed out after {timeout}s")
        time.sleep(0.2)
    return time.monotonic() - start


def _catalogue(n: int) -> list[tuple[tuple[str, str], Any]]:
    from loraplane.operator.names import Claim

    return [
        (
            (BASES[i % 2], f"team-{i % 50:02d}-adapter-{i:06d}"),
            Claim(f"2026-01-01T{i % 24:02d}", "ns", f"a{i}"),
        )
        for i in range(n)
    ]


def _routes_cost(n: int, batch: int, max_bytes: int) -> tuple[float, float, float, int]:
    """Best of 3, per adapter: the routes built from scratch (with every ConfigMap's text); then per
    changed adapter, a flush after ``batch`` renames: the routes' update, and the changed ConfigMaps'
    text and what the publisher records of a write (the names each lists now); and the bytes of those
    ConfigMaps (each one's body goes to the API server whole: at most --max-bytes)."""
    from loraplane.operator import bbr

    holders = _catalogue(n)
    build = update = text = float("inf")
    written = 0
    for r in range(3):
        t = time.perf_counter()
        routes = bbr.Routes.build(holders, set(), max_bytes)
        listed: dict[str, str] = {}
        for s in routes.by_cm.values():
            s.data()
            listed |= dict.fromkeys(s.added, s.name)
            s.in_sync()
        build = min(build, time.perf_counter() - t)
        routes.dirty.clear()
        t = time.perf_counter()
        for i in range(r * batch, (r + 1) * batch):  # a fresh batch each round: renames
            key, claim = holders[i * 7 % n]
            routes.set_holder(key, None)
            routes.set_holder((key[0], f"renamed-{key[1]}"), claim)
        t2 = time.perf_counter()
        written = 0
        for name in routes.dirty:
            s = routes.by_cm[name]
            written += len(s.data()["adapters"])
            for gone in s.removed:
                listed.pop(gone, None)
            listed |= dict.fromkeys(s.added, name)
            s.in_sync()
        t3 = time.perf_counter()
        update, text = min(update, t2 - t), min(text, t3 - t2)
    return build / n, update / batch, text / batch, written


def recompute(sizes: list[int], batch: int, max_bytes: int) -> None:
    print(
        f"\nbody-based-routing map in memory, per adapter, at N and 20N side by side (best of 3; a flush of "
        f"{batch} renames spread over {len(BASES)} base models; --max-bytes {max_bytes}):"
    )
    print(
        f"{'N':>8} {'build us':>9} {'flush: map us':>14} {'+ text us':>10} {'= us':>7} {'ConfigMap bytes':>16}"
        f"  {'rebuilt per flush (before) us':>30}"
    )
    for n in sizes:
        rows = [(m, *_routes_cost(m, batch, max_bytes)) for m in (n, 20 * n)]
        for m, build, update, text, written in rows:
            us = 1e6
            line = (
                f"{m:>8} {build * us:9.2f} {update * us:14.2f} {text * us:10.2f} {(update + text) * us:7.2f}"
            )
            print(f"{line} {written:>16}  {build * m / batch * us:30.1f}")
        (_, b1, u1, t1, _), (_, b2, u2, t2, _) = rows
        print(
            f"  ratio 20N/N: build {b2 / b1:.2f}x, flush map {u2 / u1:.2f}x, flush in all {(u2 + t2) / (u1 + t1):.2f}x "
            f"(the text grows with the ConfigMaps' bytes, at most --max-bytes each)"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="adapters (half per base model)")
    p.add_argument("--window", type=float, default=1.0, help="the operator's --bbr-window (seconds)")
    p.add_argument("--max-bytes", type=int, default=900_000, help="the operator's --bbr-max-bytes")
    p.add_argument(
        "--recompute", default="500,5000", help="catalogue sizes N of the in-memory timing (and 20N)"
    )
    p.add_argument("--batch", type=int, default=100, help="renames per flush in the in-memory timing")
    a = p.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(None, Path(tmp), "bbr-bench")
        ns, core, co = cluster.ns, cluster.core, cluster.co
        ledger = f"{ns}-ledger"  # the ID ledger is a ConfigMap too: elsewhere, so only BBR's are counted
        core.create_namespace({"metadata": {"name": ledger}})

        def writes() -> int:
            return sum(c for kind, c in cluster.writes(ns).items() if kind.startswith("configmaps "))

        op = operator_proc(
            cluster, Path(tmp) / "operator.log", 60.0, "--ledger-namespace", ledger, "--bbr-namespace", ns,
            "--bbr-window", str(a.window), "--bbr-max-bytes", str(a.max_bytes),
        ).start()  # fmt: skip
        try:
            want: dict[str, str] = {}

            def phase(what: str, act: Any) -> None:
                before, start = writes(), time.monotonic()
                act()
                took = wait_until(lambda: routes(core, ns)[0] == want, 600)
                done = writes() - before
                changed = max(1, a.n if what != "rename 10%" else a.n // 10)
                print(
                    f"{what:<12} {changed:>6} adapters: {done:>4} ConfigMap writes ({done / changed:.4f} per adapter; "
                    f"per-adapter writes would be {changed}), ConfigMaps {routes(core, ns)[1]}, "
                    f"settled {took:.1f}s after the last call ({time.monotonic() - start:.1f}s in all)"
                )

            def create() -> None:
                for i in range(a.n):
                    base = BASES[i % 2]
                    spec = {"baseModel": base, "path": f"/models/a{i}"}
                    body = {
                        "apiVersion": f"{GROUP}/{VERSION}",
                        "kind": "LoRAAdapter",
                        "metadata": {"name": f"a{i:05d}"},
                        "spec": spec,
                    }
                    co.create_namespaced_custom_object(GROUP, VERSION, ns, "loraadapters", body)
                    want[f"a{i:05d}"] = base

            def rename() -> None:
                for i in range(0, a.n, 10):
                    co.patch_namespaced_custom_object(
                        GROUP, VERSION, ns, "loraadapters", f"a{i:05d}", {"spec": {"name": f"r{i:05d}"}}
                    )
                    want[f"r{i:05d}"] = want.pop(f"a{i:05d}")

            def delete() -> None:
                for i in range(a.n):
                    co.delete_namespaced_custom_object(GROUP, VERSION, ns, "loraadapters", f"a{i:05d}")
                want.clear()

            print(
                f"N={a.n} adapters of {len(BASES)} base models, --bbr-window {a.window}s, --bbr-max-bytes {a.max_bytes}"
            )
            phase("create", create)
            phase("rename 10%", rename)
            phase("delete all", delete)
        finally:
            op.stop()
            cluster.close()
    recompute([int(x) for x in a.recompute.split(",") if x], a.batch, a.max_bytes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
