"""Fair share against first come, first served: a victim beside an aggressor, on both engines in one run.

A victim sends short streamed requests at a steady low rate (open loop: one every ``--interval``); an aggressor floods with long ones
(``--aggressor-clients`` closed-loop clients, in a process of their own; its measured token rate over the victim's is printed and
should be 20x or more). Two scenarios: the victim and the aggressor on two adapters, and on one adapter
with two API keys (two tenants). Each (engine, policy) server runs in its own process, one at a time
(``--scheduling-policy fcfs`` or ``fair``, the worker's HTTP app and API-key file), first the victim
alone (its solo figures), then victim and aggressor together.

Printed per engine and scenario: the victim's p50 and p99 time to first token over its own solo figures,
FCFS and fair; total output tokens/s fair / FCFS (targets: fair p99 within 1.5x of solo, throughput at
least 0.95). Ratios only: the machine is shared, absolute times mean little.

    .venv-vllm/bin/python benchmarks/bench_fairness.py [--engines builtin,vllm] [--seconds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench_engines import make_weights, serve_engine

PORT_LINE = "bench-fairness serving on port "
VICTIM_KEY, AGGRESSOR_KEY = "victim-key-0001", "aggressor-key-01"
SCENARIOS = {  # name -> (victim (model, key), aggressor (model, key))
    "two adapters": (("a0", VICTIM_KEY), ("a1", VICTIM_KEY)),
    "two keys, one adapter": (("a0", VICTIM_KEY), ("a0", AGGRESSOR_KEY)),
}


async def serve(args: argparse.Namespace) -> None:
    """One engine with a scheduling policy behind the worker's HTTP app; prints its port, serves until killed."""
    from loraplane.worker.api.webapp import ServeSettings
    from loraplane.worker.settings import EngineConfig

    keys = Path(args.base).parent / "keys"
    keys.write_text(f"{VICTIM_KEY} tenant=victim\n{AGGRESSOR_KEY} tenant=aggressor\n")
    cuda = args.device == "cuda"
    config = EngineConfig(
        kind=args.serve, device=args.device, dtype="auto", max_loras=2, max_cpu_loras=2, max_lora_rank=args.rank,
        max_model_len=1024, gpu_memory_utilization=0.9 if cuda else 0.3, tensor_parallel_size=1,
        max_num_seqs=args.max_num_seqs, scheduling_policy=args.policy,
        vllm_args=("" if cuda else "--kv-cache-memory-bytes=1G ") + f"--max-num-seqs={args.max_num_seqs}",
    )  # fmt: skip
    settings = ServeSettings(host="127.0.0.1", port=0, access_log=False, api_key_file=str(keys))
    await serve_engine(config, settings, args, PORT_LINE)


def start_server(
    kind: str, policy: str, base: Path, adapters: list[Path], args: argparse.Namespace, log: Path
) -> tuple[Any, str]:
    cmd = [
        sys.executable, __file__, "--serve", kind, "--policy", policy, "--base", str(base),
        "--adapter-dirs", json.dumps([str(a) for a in adapters]), "--device", args.device,
        "--rank", str(args.rank), "--max-num-seqs", str(args.max_num_seqs),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=dict(os.environ)
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(PORT_LINE):
            threading.Thread(target=proc.stdout.read, daemon=True).start()
            return proc, f"http://127.0.0.1:{int(line.removeprefix(PORT_LINE))}"
    proc.wait(60)
    raise SystemExit(f"the {kind} server did not start:\n{log.read_text()[-3000:]}")


def request(url: str, model: str, key: str, prompt: list[int], max_tokens: int) -> tuple[float, int]:
    """(time to first token, output tokens) of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    start = time.perf_counter()
    first, tokens = 0.0, 0
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if not first and chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, tokens


def preemptions(url: str) -> int:
    """Requests the vLLM worker took back for fair share so far (its /metrics); 0 where not exported."""
    with urllib.request.urlopen(url + "/metrics", timeout=60) as r:
        lines = r.read().decode().splitlines()
    return sum(
        int(float(x.split()[-1])) for x in lines if x.startswith("loraplane_worker_preemptions_total ")
    )


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def flood(url: str, model: str, key: str, args: argparse.Namespace, stop: Any, tokens: Any) -> None:
    """The aggressor: ``--aggressor-clients`` closed-loop clients, counting prompt + output tokens in
    ``tokens``. It runs in a process of its own, as another tenant's clients would: in the victim's
    process its threads' stream parsing held the interpreter lock the victim's timing needs."""

    def client(i: int) -> None:
        prompt = [(11 * i + j) % 250 + 3 for j in range(args.long_prompt)]
        while not stop.is_set():
            _, n = request(url, model, key, prompt, args.long_tokens)
            with tokens.get_lock():
                tokens.value += n + args.long_prompt

    threads = [threading.Thread(target=client, args=(i,)) for i in range(args.aggressor_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)


def run(url: str, scenario: str, args: argparse.Namespace, *, aggressor: bool) -> dict[str, Any]:
    """The victim's TTFTs (and, with the aggressor, both token rates) over ``--seconds``."""
    (v_model, v_key), (a_model, a_key) = SCENARIOS[scenario]
    out = {"victim": 0}
    lock = threading.Lock()
    spawn = multiprocessing.get_context("spawn")
    stop, aggr = spawn.Event(), spawn.Value("q", 0)
    flooding = spawn.Process(target=flood, args=(url, a_model, a_key, args, stop, aggr), daemon=True)
    if aggressor:
        flooding.start()
        time.sleep(args.warmup)
    ttfts: list[float] = []

    def victim(k: int) -> None:  # open loop: one request every --interval, whatever the answers take
        first, n = request(url, v_model, v_key, [(5 * k + j) % 250 + 3 for j in range(8)], args.short_tokens)
        with lock:
            ttfts.append(first)
            out["victim"] += n + 8

    start = time.perf_counter()
    victims = []
    for k in range(max(1, round(args.seconds / args.interval))):
        victims.append(threading.Thread(target=victim, args=(k,), daemon=True))
        victims[-1].start()
        time.sleep(max(0.0, start + (k + 1) * args.interval - time.perf_counter()))
    for t in victims:
        t.join(600)
    elapsed = time.perf_counter() - start
    with aggr.get_lock():
        aggr_tokens = aggr.value
    stop.set()
    if aggressor:
        flooding.join(600)
    return {"ttft": ttfts, "victim_rate": out["victim"] / elapsed, "aggr_rate": aggr_tokens / elapsed,
            "throughput": (out["victim"] + aggr_tokens) / elapsed}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="builtin,vllm")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--max-num-seqs", type=int, default=8, help="rows of either engine")
    p.add_argument("--seconds", type=float, default=20.0, help="victim requests for this long per phase")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between victim requests")
    p.add_argument("--short-tokens", type=int, default=8)
    p.add_argument("--long-prompt", type=int, default=64)
    p.add_argument("--long-tokens", type=int, default=256)
    p.add_argument("--aggressor-clients", type=int, default=16)
    p.add_argument(
        "--warmup", type=float, default=3.0, help="seconds the flood runs before the victim starts"
    )
    p.add_argument("--start-timeout", type=float, default=900)
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--policy", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--adapter-dirs", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        asyncio.run(serve(args))
        return
    args.adapters = 2
    with tempfile.TemporaryDirectory(prefix="bench-fairness-") as tmp:
        root = Path(tmp)
        base, adapters = make_weights(root, args)
        print(f"weights: hidden {args.hidden}, {args.layers} layers; {args.max_num_seqs} rows; victim: 8+"
              f"{args.short_tokens} tokens every {args.interval:g} s; aggressor: {args.aggressor_clients} "
              f"clients of {args.long_prompt}+{args.long_tokens} tokens; {args.seconds:g} s per phase", flush=True)  # fmt: skip
        results: dict[tuple[str, str, str], dict[str, Any]] = {}
        for kind in [k for k in args.engines.split(",") if k]:
            for policy in ("fcfs", "fair"):
                proc, url = start_server(kind, policy, base, adapters, args, root / f"{kind}-{policy}.log")
                try:
                    for scenario in SCENARIOS:
                        solo = run(url, scenario, args, aggressor=False)
                        before = preemptions(url)
                        loaded = run(url, scenario, args, aggressor=True)
                        loaded["preemptions"] = preemptions(url) - before
                        results[(kind, policy, scenario)] = {"solo": solo, "loaded": loaded}
                        print(f"  {kind:8s} {policy:5s} {scenario:22s} victim p50/p99 TTFT solo "
                              f"{pct(solo['ttft'], .5) * 1e3:.0f}/{pct(solo['ttft'], .99) * 1e3:.0f} ms, loaded "
                              f"{pct(loaded['ttft'], .5) * 1e3:.0f}/{pct(loaded['ttft'], .99) * 1e3:.0f} ms; "
                              f"aggressor/victim token rate {loaded['aggr_rate'] / loaded['victim_rate']:.0f}x; "
                              f"{loaded['throughput']:.0f} tokens/s; {loaded['preemptions']} preemptions", flush=True)  # fmt: skip
                finally:
                    proc.send_signal(signal.SIGTERM)
                    try:
                        proc.wait(120)
                    except subprocess.TimeoutExpired:
                        proc.kill()
        print("\nvictim TTFT over its solo figure (p50, p99) and throughput fair / FCFS:")
        print(
            f"  {'engine':8s} {'scenario':22s} {'FCFS p50':>9s} {'FCFS p99':>9s} {'fair p50':>9s} {'fair p99':>9s} {'tput fair/FCFS':>15s}"
        )
        for kind in [k for k in args.engines.split(",") if k]:
            for scenario in SCENARIOS:
                row = []
                for policy in ("fcfs", "fair"):
                    r = results[(kind, policy, scenario)]
                    for q in (0.5, 0.99):
                        row.append(pct(r["loaded"]["ttft"], q) / pct(r["solo"]["ttft"], q))
                tput = (
                    results[(kind, "fair", scenario)]["loaded"]["throughput"]
                    / results[(kind, "fcfs", scenario)]["loaded"]["throughput"]
                )
                print(f"  {kind:8s} {scenario:22s} " + " ".join(f"{x:8.2f}x" for x in row) + f" {tput:15.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
