"""Fair share against first come, first served: a victim beside an aggressor, on both engines in one run.

A victim sends short streamed requests at a steady low rate (open loop: one every ``--interval``); an aggressor floods with long ones
(``--aggressor-clients`` closed-loop clients in a process of their own, as another client machine would
be; its token rate over the victim's is printed and should be 20x or more). Two scenarios: the victim
and the aggressor on two adapters, and on one adapter with two API keys (two tenants). Each (engine,
policy) server runs in its own process, one at a time (``--scheduling-policy fcfs`` or ``fair``, the
worker's HTTP app and API-key file), first the victim alone (its solo figures), then victim and
aggressor together; ``--rounds`` repeats that, alternating the servers, and pools the samples (on a
shared machine the load drifts between phases).

Printed per engine and scenario: the victim's p50 and p99 time to first token over its own solo figures,
FCFS and fair; total tokens/s (prompt + output of both tenants, counted within the phase's window:
output spread over each request's streaming time) fair / FCFS (targets: fair p99 within 1.5x of solo,
throughput at least 0.95). Ratios only: the machine is shared, absolute times mean little.

    .venv-vllm/bin/python benchmarks/bench_fairness.py [--engines builtin,vllm] [--seconds 20] [--rounds 2]
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


def request(
    url: str, model: str, key: str, prompt: list[int], max_tokens: int
) -> tuple[float, float, float, int]:
    """(start, first token, end) on the monotonic clock and the output tokens of one streamed completion."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
    start = time.monotonic()
    first, tokens = 0.0, 0
    req = urllib.request.Request(url + "/v1/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if not first and chunk.get("choices") and chunk["choices"][0].get("text") is not None:
                first = time.monotonic()
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return start, first, time.monotonic(), tokens


def flood(url: str, model: str, key: str, args: argparse.Namespace, stop: Any, out: Any) -> None:
    """The aggressor's closed-loop clients, in a process of their own (so that parsing their streams does
    not hold the victim's client thread off the GIL); sends back every request's ``request`` tuple."""
    done: list[tuple[float, float, float, int]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        prompt = [(11 * i + j) % 250 + 3 for j in range(args.long_prompt)]
        while not stop.is_set():
            r = request(url, model, key, prompt, args.long_tokens)
            with lock:
                done.append(r)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(args.aggressor_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    out.send(done)


def in_window(done: list[tuple[float, float, float, int]], prompt: int, t0: float, t1: float) -> float:
    """Tokens of ``done`` requests processed within [t0, t1]: the prompt at the first token, the output
    spread evenly from the first token to the end (so a window counts what ran in it, not whole requests
    that happened to end in it)."""
    total = 0.0
    for _, first, end, n in done:
        if t0 <= first <= t1:
            total += prompt
        if end > first:
            total += n * max(0.0, min(end, t1) - max(first, t0)) / (end - first)
    return total


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


def run(url: str, scenario: str, args: argparse.Namespace, *, aggressor: bool) -> dict[str, Any]:
    """The victim's TTFTs, and the tokens per second of both, over ``--seconds``."""
    (v_model, v_key), (a_model, a_key) = SCENARIOS[scenario]
    mp = multiprocessing.get_context("spawn")
    stop, (receive, send) = mp.Event(), mp.Pipe(duplex=False)
    flooder = mp.Process(target=flood, args=(url, a_model, a_key, args, stop, send), daemon=True)
    if aggressor:
        flooder.start()
        time.sleep(args.warmup)
    victims: list[tuple[float, float, float, int]] = []
    lock = threading.Lock()

    def victim(k: int) -> None:  # open loop: one request every --interval, whatever the answers take
        r = request(url, v_model, v_key, [(5 * k + j) % 250 + 3 for j in range(8)], args.short_tokens)
        with lock:
            victims.append(r)

    start = time.monotonic()
    threads = []
    for k in range(max(1, round(args.seconds / args.interval))):
        threads.append(threading.Thread(target=victim, args=(k,), daemon=True))
        threads[-1].start()
        time.sleep(max(0.0, start + (k + 1) * args.interval - time.monotonic()))
    for t in threads:
        t.join(600)
    end = time.monotonic()
    aggr = 0.0
    if aggressor:
        stop.set()
        aggr = in_window(receive.recv(), args.long_prompt, start, end)
        flooder.join(60)
    vict = in_window(victims, 8, start, end)
    return {"ttft": [first - begin for begin, first, _, _ in victims], "victim_tokens": vict,
            "aggr_tokens": aggr, "elapsed": end - start}  # fmt: skip


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
    p.add_argument(
        "--rounds", type=int, default=1, help="runs of every server, alternated; figures pool their samples"
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
        engines = [k for k in args.engines.split(",") if k]
        # (engine, policy, scenario) -> solo / loaded -> the phases' TTFTs and tokens, pooled over rounds
        results: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}
        for rnd in range(args.rounds):
            for kind in engines:
                for policy in ("fcfs", "fair"):
                    proc, url = start_server(
                        kind, policy, base, adapters, args, root / f"{kind}-{policy}.log"
                    )
                    try:
                        for scenario in SCENARIOS:
                            phases = {"solo": run(url, scenario, args, aggressor=False),
                                      "loaded": run(url, scenario, args, aggressor=True)}  # fmt: skip
                            pooled = results.setdefault((kind, policy, scenario), {})
                            for phase, r in phases.items():
                                into = pooled.setdefault(phase, {"ttft": [], "victim_tokens": 0.0,
                                                                 "aggr_tokens": 0.0, "elapsed": 0.0})  # fmt: skip
                                into["ttft"] += r["ttft"]
                                for k in ("victim_tokens", "aggr_tokens", "elapsed"):
                                    into[k] += r[k]
                            solo, loaded = phases["solo"], phases["loaded"]
                            print(f"  round {rnd + 1} {kind:8s} {policy:5s} {scenario:22s} victim p50/p99 TTFT solo "
                                  f"{pct(solo['ttft'], .5) * 1e3:.0f}/{pct(solo['ttft'], .99) * 1e3:.0f} ms, loaded "
                                  f"{pct(loaded['ttft'], .5) * 1e3:.0f}/{pct(loaded['ttft'], .99) * 1e3:.0f} ms; "
                                  f"aggressor/victim tokens {loaded['aggr_tokens'] / loaded['victim_tokens']:.0f}x; "
                                  f"{throughput(loaded):.0f} tokens/s", flush=True)  # fmt: skip
                    finally:
                        proc.send_signal(signal.SIGTERM)
                        try:
                            proc.wait(120)
                        except subprocess.TimeoutExpired:
                            proc.kill()
        print(
            f"\nvictim TTFT over its solo figure (p50, p99; {args.rounds} round(s) pooled) and throughput fair / FCFS:"
        )
        print(
            f"  {'engine':8s} {'scenario':22s} {'FCFS p50':>9s} {'FCFS p99':>9s} {'fair p50':>9s} {'fair p99':>9s} {'tput fair/FCFS':>15s}"
        )
        for kind in engines:
            for scenario in SCENARIOS:
                row = []
                for policy in ("fcfs", "fair"):
                    r = results[(kind, policy, scenario)]
                    for q in (0.5, 0.99):
                        row.append(pct(r["loaded"]["ttft"], q) / pct(r["solo"]["ttft"], q))
                tput = throughput(results[(kind, "fair", scenario)]["loaded"]) / throughput(
                    results[(kind, "fcfs", scenario)]["loaded"]
                )
                print(f"  {kind:8s} {scenario:22s} " + " ".join(f"{x:8.2f}x" for x in row) + f" {tput:15.2f}")  # fmt: skip


def throughput(phase: dict[str, Any]) -> float:
    """Prompt + output tokens per second of both tenants in a phase."""
    return (phase["victim_tokens"] + phase["aggr_tokens"]) / phase["elapsed"]


if __name__ == "__main__":
    main()
