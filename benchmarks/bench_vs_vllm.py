"""The worker against vLLM's own OpenAI server: what loraplane's serving path costs over the bare engine.

Three servers on one checkpoint and the same ``--adapters`` adapters (rank ``--rank`` on all seven
projections), each in its own process tree:
  vllm-serve      vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``) with
                  ``--enable-lora --lora-modules a0=... a1=...``. In .venv-vllm, vLLM loads loraplane's
                  plugin (worker/vllm/plugin.py) in every vLLM process, this server's too;
  vllm-bare       the same server with no plugin loaded (VLLM_PLUGINS=""): bare vLLM, so the plugin's
                  own cost in the engine core shows as vllm-serve / vllm-bare;
  worker-vllm     the worker's HTTP app with ``--engine vllm`` (bench_engines.py's ``--serve``);
  worker-builtin  the same with the built-in engine; ``worker-builtin@T`` runs it with
                  LORAPLANE_MMAP_THRESHOLD=T (bytes, or ``glibc``: see worker/builtin/heap.py), so
                  malloc settings compare side by side (``--servers worker-builtin,worker-builtin@glibc``).
Both vLLM servers get the same engine settings: max_loras ``--max-loras``, max_cpu_loras = adapters,
max_lora_rank, dtype auto, max_model_len 512, 2 GiB of KV cache (``--kv-cache-memory-bytes``), the
model in the engine-core process (``uni``). Two request streams from ``--clients`` concurrent clients:
"lora" (round robin over the adapters) and "base" (every request on the base model). Rounds interleave
servers and streams (the order flips each round), so load on the machine hits all alike.

Printed: output tokens/s per (server, stream); worker-vllm / vllm-serve per stream (target >= 0.97;
also / vllm-bare when it runs) and worker-builtin LoRA / base (target >= 0.85), each as the median
of the per-round ratios with their spread; and each server's peak RSS (VmHWM summed over its process tree: the API process and vLLM's
engine core; shared library pages count once per process). No absolute time is asserted anywhere.

    .venv-vllm/bin/python benchmarks/bench_vs_vllm.py [--rounds 3] [--requests 96] [--servers ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# Weights, the worker's server and the load generator are bench_engines.py's (benchmarks/ is on sys.path).
from bench_engines import BASE, add_stream_args, make_weights, run_load, start_server

SERVERS = ("vllm-serve", "vllm-bare", "worker-vllm", "worker-builtin")
DEFAULT_SERVERS = ("vllm-serve", "worker-vllm", "worker-builtin")
MAX_MODEL_LEN = 512  # bench_engines.serve's setting for the worker
KV_BYTES = "2G"  # bench_engines.serve's --vllm-args on CPU


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_vllm_serve(
    base: Path, adapters: list[Path], args: argparse.Namespace, log: Path, *, plugins: bool = True
) -> tuple[subprocess.Popen[bytes], str]:
    """vLLM's own OpenAI server with the worker's engine settings; returns once /v1/models answers.
    ``plugins`` False: vLLM loads no general plugin (loraplane's included)."""
    port = free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1", "--port", str(port),
        "--model", str(base), "--served-model-name", BASE, "--dtype", "auto",
        "--max-model-len", str(MAX_MODEL_LEN), "--enable-lora", "--max-loras", str(args.max_loras),
        "--max-cpu-loras", str(max(args.adapters, args.max_loras)), "--max-lora-rank", str(args.rank),
        "--distributed-executor-backend", "uni", "--disable-uvicorn-access-log",
        "--lora-modules", *(f"a{i}={path}" for i, path in enumerate(adapters)),
    ]  # fmt: skip
    if args.device == "cuda":
        cmd += ["--gpu-memory-utilization", "0.9"]
    else:
        cmd += ["--gpu-memory-utilization", "0.3", f"--kv-cache-memory-bytes={KV_BYTES}"]
    env = None if plugins else {**os.environ, "VLLM_PLUGINS": ""}  # "" names no plugin: none loads
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"{log.stem} exited ({proc.returncode}); see its log:\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url + "/v1/models", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(1)
    stop(proc)
    raise SystemExit(
        f"{log.stem} did not answer within {args.start_timeout} s; log:\n{log.read_text()[-3000:]}"
    )


def engine_counters(url: str) -> dict[str, float]:
    """The built-in engine's step and slot-load counters from the worker's /metrics; {} for vLLM."""
    with urllib.request.urlopen(url + "/metrics", timeout=30) as r:
        text = r.read().decode()
    names = {
        "loraplane_worker_batch_size_count": "steps",
        "loraplane_worker_batch_size_sum": "seqs",
        'loraplane_worker_adapter_loads_total{tier="device"}': "slot_loads",
    }
    found = {
        names[k]: float(v) for k, _, v in (line.rpartition(" ") for line in text.splitlines()) if k in names
    }
    return {**{"slot_loads": 0.0}, **found} if "steps" in found else {}


def tree_peak_rss(pid: int) -> int:
    """Sum of VmHWM (bytes) over the process and its descendants that are alive now."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # exited meanwhile
            continue
        total += next(
            (int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0
        )
    return total


def stop(proc: subprocess.Popen) -> None:  # type: ignore[type-arg]
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} (spread {min(values):.3f}-{max(values):.3f}, n={len(values)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--servers",
        default=",".join(DEFAULT_SERVERS),
        help="comma-separated: " + ", ".join(SERVERS) + ", worker-builtin@T",
    )
    add_stream_args(p, requests=96, rounds=3)
    p.add_argument("--start-timeout", type=float, default=600.0)
    args = p.parse_args()
    servers = [s for s in args.servers.split(",") if s]
    if unknown := {s.split("@")[0] for s in servers} - set(SERVERS):
        p.error(f"unknown servers {sorted(unknown)}; choose from {', '.join(SERVERS)}")
    tput: dict[tuple[str, str], list[float]] = {}
    rss: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="bench-vs-vllm-") as tmp:
        root = Path(tmp)
        base, adapters = make_weights(root, args)
        running: dict[str, tuple[subprocess.Popen, str]] = {}  # type: ignore[type-arg]
        try:
            t0 = time.perf_counter()

            def start(name: str) -> None:  # all at once: vLLM's start is mostly waiting (minutes each)
                log = root / f"{name}.log"
                if name in ("vllm-serve", "vllm-bare"):
                    running[name] = start_vllm_serve(base, adapters, args, log, plugins=name == "vllm-serve")
                else:
                    kind, _, threshold = name.removeprefix("worker-").partition("@")
                    env = {"LORAPLANE_MMAP_THRESHOLD": threshold} if threshold else None
                    running[name] = start_server(kind, base, adapters, args, log, env)
                print(f"{name}: serving after {time.perf_counter() - t0:.0f} s", flush=True)

            with ThreadPoolExecutor(len(servers)) as pool:
                list(pool.map(start, servers))
            warm = argparse.Namespace(**{**vars(args), "requests": args.clients})
            for _, url in running.values():  # first requests: slot loads, compiled paths, allocator
                for mode in ("lora", "base"):
                    run_load(url, mode, warm)
            for r in range(args.rounds):
                for name in servers if r % 2 == 0 else servers[::-1]:
                    for mode in ("lora", "base") if r % 2 == 0 else ("base", "lora"):
                        before = engine_counters(running[name][1])
                        value = run_load(running[name][1], mode, args)
                        tput.setdefault((name, mode), []).append(value)
                        line = f"round {r}: {name:14s} {mode:4s} {value:8.1f} output tokens/s"
                        if before:  # the built-in engine: how full its steps were, how often slots changed
                            after = engine_counters(running[name][1])
                            steps = after["steps"] - before["steps"]
                            line += (
                                f", {(after['seqs'] - before['seqs']) / max(steps, 1):.1f} sequences per step, "
                                f"{after['slot_loads'] - before['slot_loads']:.0f} slot loads in {steps:.0f} steps"
                            )
                        print(line, flush=True)
            rss = {name: tree_peak_rss(proc.pid) for name, (proc, _) in running.items()}
        finally:
            for proc, _ in running.values():
                stop(proc)
    print(
        f"\n{args.clients} clients, {args.requests} requests x {args.prompt_len}+{args.max_tokens} tokens per run, "
        f"{args.rounds} rounds; hidden {args.hidden}, {args.layers} layers, {args.adapters} adapters of rank "
        f"{args.rank} (max_loras {args.max_loras}), device {args.device}"
    )

    def ratios(a: list[float], b: list[float]) -> str:
        return spread([x / y for x, y in zip(a, b, strict=True)])

    for name in servers:
        lora, base_ = tput[(name, "lora")], tput[(name, "base")]
        print(
            f"  {name:14s}: LoRA {statistics.median(lora):8.1f} tok/s, base {statistics.median(base_):8.1f} tok/s, "
            f"peak RSS {rss[name] / 2**20:.0f} MiB; LoRA / base {ratios(lora, base_)}"
        )
    pairs = [("worker-vllm", "vllm-serve", " (target >= 0.97)"), ("worker-builtin", "vllm-serve", "")]
    pairs += [("worker-vllm", "vllm-bare", " (target >= 0.97)"), ("vllm-serve", "vllm-bare", "")]
    for name, bare, target in pairs:
        if name in servers and bare in servers:
            for mode in ("lora", "base"):
                print(f"  {name} / {bare} ({mode}): {ratios(tput[(name, mode)], tput[(bare, mode)])}{target}")
    for name in (s for s in servers if s.startswith("worker-builtin@") and "worker-builtin" in servers):
        for mode in ("lora", "base"):
            print(
                f"  {name} / worker-builtin ({mode}): {ratios(tput[(name, mode)], tput[('worker-builtin', mode)])}"
            )
        print(f"  {name} / worker-builtin peak RSS: {rss[name] / rss['worker-builtin']:.3f}")


if __name__ == "__main__":
    main()
