"""How fast the operator hands out IDs: N adapters created at once, with 1 and with 3 operator replicas.

Prints, measured side by side in one run against one API server (the local server by default, started
in its own process so it does not share our GIL; or a real cluster with --kubeconfig):
  - raw PATCH/s: one client patching one adapter's status in a loop (the server's single-client pace);
  - IDs/s and its ratio to raw PATCH/s (target >= 0.5);
  - the operators' API writes per assigned ID, from the local server's audit log (target <= 2);
  - p50/p99 create-to-ID latency: from sending the create to seeing status.id on a watch (target p99 <= 1 s).

    python benchmarks/bench_allocation.py            # N=1000
    python benchmarks/bench_allocation.py --n 200    # CI
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests
import yaml

REPO = Path(__file__).resolve().parent.parent
GROUP, VERSION, PLURAL = "loraplane.io", "v1alpha1", "loraadapters"
BASE = "meta-llama/Llama-2-7b-hf"
OP_TOKEN = "bench-operator-token"
WRITES = ("create", "update", "patch", "delete", "deletecollection")


def _serve(conn: Any) -> None:
    """Child process: the local API server; answers "writes" with the operator user's writes by resource."""
    from loraplane.localkube import LocalKube

    server = LocalKube()
    conn.send(server.start())
    server.add_token(OP_TOKEN, "operator")
    server.add_token("bench-admin-token", "admin")
    while True:
        cmd = conn.recv()
        if cmd == "writes":
            counts = Counter(
                f"{e.verb} {e.resource}{'/' + e.subresource if e.subresource else ''} {e.code}"
                for e in server.audit_log
                if e.user == "operator" and e.verb in WRITES
            )
            conn.send(dict(counts))
        else:
            server.stop()
            conn.send("stopped")
            return


class Cluster:
    """The API server under test plus plain HTTP helpers (requests: the leanest single client)."""

    def __init__(self, kubeconfig: str | None, tmp: Path) -> None:
        self.conn = None
        self.proc = None
        if kubeconfig:
            self.admin_kubeconfig = self.operator_kubeconfig = kubeconfig
        else:
            from loraplane.localkube import write_kubeconfig

            ctx = multiprocessing.get_context("spawn")
            self.conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=_serve, args=(child,), daemon=True)
            self.proc.start()
            url = self.conn.recv()
            self.admin_kubeconfig = str(
                write_kubeconfig(url, tmp / "admin.kubeconfig", token="bench-admin-token")
            )
            self.operator_kubeconfig = str(write_kubeconfig(url, tmp / "operator.kubeconfig", token=OP_TOKEN))
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=self.admin_kubeconfig, client_configuration=cfg)
        self.url = cfg.host.rstrip("/")
        self.headers = {"Authorization": cfg.get_api_key_with_prefix("authorization") or ""}
        self.verify: Any = cfg.ssl_ca_cert or cfg.verify_ssl
        self.cert = (cfg.cert_file, cfg.key_file) if cfg.cert_file else None

    def session(self) -> requests.Session:
        s = requests.Session()
        s.headers.update(self.headers)
        s.verify, s.cert = self.verify, self.cert
        return s

    def writes(self) -> dict[str, int] | None:
        if self.conn is None:
            return None
        self.conn.send("writes")
        return self.conn.recv()

    def stop(self) -> None:
        if self.conn is not None:
            self.conn.send("stop")
            self.conn.recv()
            self.proc.join(10)  # type: ignore[union-attr]

    def apply_crds(self) -> None:
        s = self.session()
        for f in sorted((REPO / "crds").glob("*.yaml")):
            doc = yaml.safe_load(f.read_text())
            name = doc["metadata"]["name"]
            base = f"{self.url}/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
            r = s.get(f"{base}/{name}")
            if r.status_code == 404:
                s.post(base, json=doc).raise_for_status()
            else:
                doc["metadata"]["resourceVersion"] = r.json()["metadata"]["resourceVersion"]
                s.put(f"{base}/{name}", json=doc).raise_for_status()
            for _ in range(300):
                conds = (s.get(f"{base}/{name}").json().get("status") or {}).get("conditions") or []
                if any(c["type"] == "Established" and c["status"] == "True" for c in conds):
                    break
                time.sleep(0.1)

    def namespace(self) -> str:
        name = f"bench-{uuid.uuid4().hex[:6]}"
        self.session().post(
            f"{self.url}/api/v1/namespaces", json={"metadata": {"name": name}}
        ).raise_for_status()
        return name

    def adapters_url(self, ns: str) -> str:
        return f"{self.url}/apis/{GROUP}/{VERSION}/namespaces/{ns}/{PLURAL}"


def adapter(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LoRAAdapter",
        "metadata": {"name": name},
        "spec": {"baseModel": BASE, "path": f"/models/{name}"},
    }


def raw_patch_rate(cluster: Cluster, ns: str, name: str, seconds: float = 3.0) -> float:
    """One client, one adapter, merge-patching its status as fast as the server answers."""
    s = cluster.session()
    base = cluster.adapters_url(ns)
    s.post(base, json=adapter(name)).raise_for_status()
    url = f"{base}/{name}/status"
    headers = {"Content-Type": "application/merge-patch+json"}
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        s.patch(
            url, data=json.dumps({"status": {"message": f"patch {n}"}}), headers=headers
        ).raise_for_status()
        n += 1
    return n / (time.perf_counter() - t0)


class IdWatch:
    """Watches a namespace and records when each adapter is first seen with status.id."""

    def __init__(self, cluster: Cluster, ns: str) -> None:
        self.cluster, self.ns = cluster, ns
        self.first: dict[str, float] = {}
        self.ids: dict[str, int] = {}
        self.stop = threading.Event()
        s = cluster.session()
        self.rv = s.get(cluster.adapters_url(ns)).json()["metadata"]["resourceVersion"]
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _see(self, obj: dict[str, Any]) -> None:
        id_ = (obj.get("status") or {}).get("id")
        name = obj["metadata"]["name"]
        if id_ and name not in self.first:
            self.first[name] = time.perf_counter()
            self.ids[name] = id_

    def _run(self) -> None:
        s = self.cluster.session()
        while not self.stop.is_set():
            url = f"{self.cluster.adapters_url(self.ns)}?watch=1&resourceVersion={self.rv}&timeoutSeconds=5"
            try:
                with s.get(url, stream=True, timeout=30) as r:
                    for line in r.iter_lines():
                        if not line:
                            continue
                        ev = json.loads(line)
                        if ev.get("type") == "ERROR":  # 410 Gone and friends: re-list below.
                            raise ValueError(ev["object"].get("message"))
                        self.rv = ev["object"]["metadata"].get("resourceVersion", self.rv)
                        self._see(ev["object"])
                        if self.stop.is_set():
                            return
            except (ValueError, requests.RequestException) as exc:
                print(f"watch restarted with a list: {exc}", file=sys.stderr)
                listing = s.get(self.cluster.adapters_url(self.ns)).json()
                for obj in listing["items"]:
                    self._see(obj)
                self.rv = listing["metadata"]["resourceVersion"]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_scenario(
    cluster: Cluster, n: int, replicas: int, clients: int, block: int, tmp: Path
) -> dict[str, Any]:
    ns = cluster.namespace()
    ops = []
    for i in range(replicas):
        log = open(tmp / f"op-{replicas}-{i}.log", "wb")  # Closed with the process.
        cmd = [
            sys.executable,
            "-m",
            "loraplane.operator.main",
            "--kubeconfig",
            cluster.operator_kubeconfig,
            "--namespace",
            ns,
            "--ledger-namespace",
            ns,
            "--metrics-port",
            "0",
            "--block-size",
            str(block),
            "--shard",
            f"{i}/{replicas}",
        ]
        ops.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        s = cluster.session()
        s.post(cluster.adapters_url(ns), json=adapter("warmup")).raise_for_status()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            logs = [(tmp / f"op-{replicas}-{i}.log").read_text() for i in range(replicas)]
            got = (s.get(f"{cluster.adapters_url(ns)}/warmup").json().get("status") or {}).get("id")
            if got and all("Initial authentication has finished" in t for t in logs):
                break
            time.sleep(0.2)
        time.sleep(1.0)  # Every replica's watch is established.
        before = cluster.writes()
        cpu0 = sum(_cpu_seconds(p.pid) for p, _ in ops)
        watch = IdWatch(cluster, ns)
        sent: dict[str, float] = {}

        def create(chunk: range) -> None:
            cs = cluster.session()
            for i in chunk:
                name = f"a{i}"
                sent[name] = time.perf_counter()
                cs.post(cluster.adapters_url(ns), json=adapter(name)).raise_for_status()

        t0 = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            list(pool.map(create, [range(c, n, clients) for c in range(clients)]))
        created = time.perf_counter()
        deadline = time.monotonic() + max(60, n / 5)
        while sum(f"a{i}" in watch.first for i in range(n)) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        watch.stop.set()
        time.sleep(0.5)
        after = cluster.writes()
        cpu = sum(_cpu_seconds(p.pid) for p, _ in ops) - cpu0
        names = [f"a{i}" for i in range(n)]
        missing = [x for x in names if x not in watch.first]
        lat = sorted(watch.first[x] - sent[x] for x in names if x in watch.first)
        ids = [watch.ids[x] for x in names if x in watch.ids]
        end = max(watch.first[x] for x in names if x in watch.first)
        writes = None
        if before is not None and after is not None:
            writes = {
                k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)
            }
        return {
            "replicas": replicas,
            "assigned": len(ids),
            "missing": len(missing),
            "unique": len(set(ids)) == len(ids),
            "ids_per_s": len(ids) / (end - t0),
            "create_s": created - t0,
            "p50": statistics.median(lat),
            "p99": lat[min(len(lat) - 1, int(0.99 * len(lat)))],
            "writes": writes,
            "operator_cpu_s": cpu,
        }
    finally:
        for p, _ in ops:
            p.terminate()
        for p, log in ops:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
            log.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="adapters created at once")
    ap.add_argument("--clients", type=int, default=8, help="threads creating adapters")
    ap.add_argument("--block-size", type=int, default=64)
    ap.add_argument("--kubeconfig", default=None, help="a real cluster instead of the local server")
    args = ap.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="bench-alloc-"))
    cluster = Cluster(args.kubeconfig, tmp)
    try:
        cluster.apply_crds()
        ns = cluster.namespace()
        raws = [raw_patch_rate(cluster, ns, "raw0")]
        results = []
        for i, replicas in enumerate((1, 3)):
            results.append(run_scenario(cluster, args.n, replicas, args.clients, args.block_size, tmp))
            raws.append(raw_patch_rate(cluster, ns, f"raw{i + 1}"))  # Interleaved: the machine is shared.
        raw = statistics.median(raws)
    finally:
        cluster.stop()
    cpus = os.cpu_count()
    print(
        f"bench_allocation: N={args.n}, {args.clients} creating clients, block {args.block_size}, "
        f"{'local server (own process)' if not args.kubeconfig else 'cluster ' + args.kubeconfig}, {cpus} CPUs"
    )
    print(f"raw single-client PATCH/s: {raw:.0f} (median of {', '.join(f'{r:.0f}' for r in raws)})")
    for r in results:
        w = r["writes"]
        per_id = "n/a (no audit log)" if w is None else f"{sum(w.values()) / max(1, r['assigned']):.3f} {w}"
        print(
            f"{r['replicas']} operator(s): {r['assigned']}/{args.n} IDs (unique: {r['unique']}), "
            f"{r['ids_per_s']:.0f} IDs/s = {r['ids_per_s'] / raw:.2f} x raw PATCH/s; "
            f"create-to-ID p50 {r['p50'] * 1000:.0f} ms, p99 {r['p99'] * 1000:.0f} ms; "
            f"creates took {r['create_s']:.2f} s; operators' CPU {r['operator_cpu_s']:.2f} s; "
            f"API writes per ID {per_id}"
        )
    return 0 if all(r["missing"] == 0 and r["unique"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
