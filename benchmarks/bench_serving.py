"""Serving benchmark: a Zipf-distributed request stream over 4x more adapters than device slots.

Shape (issue 6): Llama-shaped, hidden 1024, intermediate 2816, 4 layers, vocab 32000, rank 16 on
all seven projections, fp32 on CPU. Random weights; the adapters are written to disk in PEFT's
format, so the tiered run really goes disk -> CPU (loader thread) -> device slot (between steps).

Two configurations, each run in a fresh process (interleaved rounds, medians), over the same stream:
  resident  max_loras = number of adapters, every adapter in a slot before timing starts;
  tiered    max_loras = adapters / 4, max_cpu_loras = adapters / 2 (LRU at both tiers).
By default the whole stream is queued at once (the scheduler picks from the backlog: maximum
throughput); ``--clients N`` makes it closed-loop instead, N clients each sending its next request
when the previous one finishes. Adapter of each request ~ Zipf(s) over the adapters; fixed prompt and
output lengths (ignore_eos). It goes through ``Engine.submit`` (scheduler, sampling, detokenizer,
tiers), not HTTP, whose cost is the same in both configurations.

Printed: generated tokens/s of each, tiered / resident as the median of the per-round ratios (each
round runs both configurations back to back) with their spread (target >= 0.9), slot and CPU loads and
evictions, and the tiered process's peak RSS against its floor (base weights + CPU-tier adapter
bytes + KV cache; target <= 1.25x; also shown with the device slots added, which on CPU live in RAM).
No assertions.

    python benchmarks/bench_serving.py [--rounds 3] [--adapters 32] [--requests 192] [--zipf 1.0]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

# The reference shape, shared with the engine benchmark (scripts run with benchmarks/ on sys.path).
from bench_engine import SHAPE

from loraplane.worker.builtin.metrics import PREFIX
from loraplane.worker.builtin.model import PROJECTIONS, CausalLM, ModelConfig
from loraplane.worker.builtin.runner import ModelRunner
from loraplane.worker.builtin.scheduler import SchedulerSettings
from loraplane.worker.builtin.service import Engine, EngineSettings
from loraplane.worker.inference.engines import Output
from loraplane.worker.inference.sampling import SamplingParams
from loraplane.worker.registry import Registry, VersionEntry

RANK = 16
_ATTN = {"q_proj", "k_proj", "v_proj", "o_proj"}


class ByteTokenizer:
    """Stands in for a real tokenizer (random weights, 32000-token vocab): one letter per token."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(97 + t % 26) for t in ids)


def save_base(model_dir: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = {k: v for k, v in SHAPE.items() if k != "model_type"}
    LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False)).save_pretrained(str(model_dir))


def write_adapter(out: Path, config: ModelConfig, seed: int) -> None:
    """A PEFT-format LoRA adapter (rank 16, all seven projections) with random weights."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(config.num_layers):
        for proj in PROJECTIONS:
            fan_in, fan_out = config.proj_shape(proj)
            key = f"base_model.model.model.layers.{layer}.{'self_attn' if proj in _ATTN else 'mlp'}.{proj}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, fan_in, generator=gen) * 0.02
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, RANK, generator=gen) * 0.02
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    config_json = {
        "peft_type": "LORA",
        "r": RANK,
        "lora_alpha": 2 * RANK,
        "target_modules": list(PROJECTIONS),
        "bias": "none",
    }
    (out / "adapter_config.json").write_text(json.dumps(config_json))


def zipf_stream(n_requests: int, n_adapters: int, s: float, seed: int) -> list[int]:
    """Adapter index per request; index 0 is the most popular."""
    weights = [1.0 / (k + 1) ** s for k in range(n_adapters)]
    return random.Random(seed).choices(range(n_adapters), weights=weights, k=n_requests)


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def drive(engine: Engine, registry: Registry, stream: list[int], args: argparse.Namespace) -> float:
    """Run the stream (all queued, or closed-loop with args.clients clients); returns seconds."""
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    pending = list(enumerate(stream))
    lock = threading.Lock()
    done = threading.Event()
    left = [len(stream)]
    failures: list[Exception] = []

    def send() -> None:
        with lock:
            if not pending:
                return
            i, adapter = pending.pop(0)
        prompt = [(i * 7 + j) % 31999 + 1 for j in range(args.prompt_len)]
        engine.submit(
            request_id=f"r{i}",
            model=f"adapter-{adapter}",
            adapter=registry.by_id(adapter + 1).lora_spec(),
            prompt_ids=prompt,
            params=params,
            on_output=on_output,
        )

    def on_output(out: Output) -> None:
        if out.finish_reason is None:
            return
        if out.error is not None:
            failures.append(out.error)
            done.set()
        with lock:
            left[0] -= 1
            if left[0] == 0:
                done.set()
        send()  # the client sends its next request (called on the engine thread, between steps)

    t0 = time.perf_counter()
    for _ in range(min(args.clients or len(stream), len(stream))):
        send()
    if not done.wait(args.timeout):
        raise TimeoutError(f"the stream did not finish within {args.timeout} s")
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed; first: {failures[0]}")
    return time.perf_counter() - t0


def run_child(args: argparse.Namespace) -> None:
    """One configuration in this (fresh) process; prints one JSON line."""
    torch.set_num_threads(args.threads)
    root = Path(args.dir)
    n = args.adapters
    resident = args.child == "resident"
    max_loras = n if resident else n // 4
    max_cpu = n if resident else n // 2
    settings = EngineSettings(
        max_loras=max_loras,
        max_lora_rank=RANK,
        max_cpu_loras=max_cpu,
        max_model_len=args.prompt_len + args.output_len + 8,
        scheduler=SchedulerSettings(max_num_seqs=args.batch, max_waiting=args.requests + 2 * args.batch),
    )
    rss_start = peak_rss()
    model = CausalLM.load(root / "base", device=torch.device("cpu"), dtype=torch.float32)
    rss_loaded = peak_rss()
    runner = ModelRunner.from_model(
        model,
        tokenizer=ByteTokenizer(),
        max_loras=max_loras,
        max_lora_rank=RANK,
        max_seqs=args.batch,
        max_model_len=settings.max_model_len,
    )
    registry = Registry()
    for k in range(n):
        registry.upsert(
            VersionEntry(
                id=k + 1,
                served_name=f"adapter-{k}",
                adapter=f"bench/adapter-{k}",
                state="Ready",
                local_dir=root / f"adapter-{k}",
            )
        )
    engine = Engine(runner, settings, model_name="bench")
    engine.run()
    try:
        if resident:  # every adapter in its slot before timing (one short request each)
            drive(engine, registry, list(range(n)), args)
        warm = zipf_stream(args.batch * 2, n, args.zipf, seed=99)
        drive(engine, registry, warm, args)  # JIT-free warm-up: caches, allocator, LRU state
        loads_before = engine.metrics.render().decode()
        steps_before = engine.scheduler.steps
        stream = zipf_stream(args.requests, n, args.zipf, seed=args.seed)
        seconds = drive(engine, registry, stream, args)
        after = engine.metrics.render().decode()
        steps = engine.scheduler.steps - steps_before
    finally:
        engine.stop()
    weights = sum(t.numel() * t.element_size() for t in model.tensors())
    adapter_bytes = engine.tiers.cpu[next(iter(engine.tiers.cpu))].nbytes if engine.tiers.cpu else 0
    result = {
        "mode": args.child,
        "tokens_per_s": args.requests * args.output_len / seconds,
        "steps": steps,
        "seconds": seconds,
        "counters": {
            key: _counter(after, key) - _counter(loads_before, key)
            for key in (
                f'{PREFIX}adapter_{kind}_total{{tier="{tier}"}}'
                for kind in ("loads", "evictions")
                for tier in ("cpu", "device")
            )
        },
        "peak_rss": peak_rss(),
        "rss_start": rss_start,
        "rss_loaded": rss_loaded,
        "weights": weights,
        "cpu_tier": max_cpu * adapter_bytes,
        "kv": runner.kv.nbytes,
        "slots": runner.bytes_per_slot * max_loras,
    }
    print(json.dumps(result))


def _counter(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--adapters", type=int, default=32, help="distinct adapters (slots = a quarter)")
    p.add_argument("--requests", type=int, default=192)
    p.add_argument("--batch", type=int, default=32, help="max sequences per step (max_num_seqs)")
    p.add_argument(
        "--clients",
        type=int,
        default=0,
        help="closed-loop clients; 0: the whole stream queued at once (backlog)",
    )
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s of adapter popularity")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--child", choices=["resident", "tiered"], help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_child(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        save_base(root / "base")
        config = ModelConfig.from_dir(root / "base")
        for k in range(args.adapters):
            write_adapter(root / f"adapter-{k}", config, seed=k)
        results: dict[str, list[dict[str, Any]]] = {"resident": [], "tiered": []}
        passthrough = [
            f"--{name.replace('_', '-')}={getattr(args, name)}"
            for name in (
                "adapters",
                "requests",
                "batch",
                "clients",
                "prompt_len",
                "output_len",
                "zipf",
                "seed",
            )
        ]
        passthrough += [f"--threads={args.threads}", f"--timeout={args.timeout}"]
        for r in range(args.rounds):
            for mode in ("resident", "tiered") if r % 2 == 0 else ("tiered", "resident"):
                out = subprocess.run(
                    [sys.executable, __file__, *passthrough, "--child", mode, "--dir", tmp],
                    capture_output=True,
                    text=True,
                )
                if out.returncode != 0:
                    sys.exit(f"the {mode} run failed:\n{out.stderr[-3000:]}")
                results[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    report(results, args)


def report(results: dict[str, list[dict[str, Any]]], args: argparse.Namespace) -> None:
    tput = {m: statistics.median(r["tokens_per_s"] for r in rs) for m, rs in results.items()}
    per_round = [
        t["tokens_per_s"] / r["tokens_per_s"]
        for t, r in zip(results["tiered"], results["resident"], strict=True)
    ]
    n = args.adapters
    print(
        f"Zipf(s={args.zipf}) stream: {args.requests} requests x {args.prompt_len}+{args.output_len} tokens, "
        f"batch {args.batch}, {f'{args.clients} closed-loop clients' if args.clients else 'all queued at once'}, "
        f"{n} adapters (rank {RANK}, all 7 projections), {args.rounds} rounds"
    )
    print(f"  resident ({n} slots):             {tput['resident']:8.1f} tokens/s")
    print(f"  tiered   ({n // 4} slots, {n // 2} on CPU): {tput['tiered']:8.1f} tokens/s")
    spread = f"{min(per_round):.3f}-{max(per_round):.3f}"
    print(
        f"  tiered / resident: median of per-round ratios {statistics.median(per_round):.3f} (target >= 0.9), "
        f"spread {spread} over {len(per_round)} rounds; per round " + ", ".join(f"{x:.3f}" for x in per_round)
    )
    mean_steps = {m: statistics.median(r["steps"] for r in rs) for m, rs in results.items()}
    print(
        f"  engine steps (median): resident {mean_steps['resident']:.0f}, tiered {mean_steps['tiered']:.0f} "
        f"(mean batch {args.requests * args.output_len / mean_steps['resident']:.1f} vs "
        f"{args.requests * args.output_len / mean_steps['tiered']:.1f})"
    )
    c = {
        k.split('"')[1] + " " + ("loads" if "_loads_" in k else "evictions"): v
        for k, v in results["tiered"][-1]["counters"].items()
    }
    steps = results["tiered"][-1]["steps"]
    print(
        f"  tiered, last round: {c['device loads']:.0f} slot loads over {steps} steps, "
        f"{c['device evictions']:.0f} slot evictions, {c['cpu loads']:.0f} disk->CPU loads, "
        f"{c['cpu evictions']:.0f} CPU evictions"
    )
    t = max(results["tiered"], key=lambda r: r["peak_rss"])
    floor = t["weights"] + t["cpu_tier"] + t["kv"]
    mib = 2**20
    print(
        f"  tiered peak RSS {t['peak_rss'] / mib:.0f} MiB vs floor {floor / mib:.0f} MiB (base weights "
        f"{t['weights'] / mib:.0f} + CPU tier {t['cpu_tier'] / mib:.0f} + KV cache {t['kv'] / mib:.0f}): "
        f"{t['peak_rss'] / floor:.2f}x (target <= 1.25); with the {n // 4} device slots in RAM "
        f"({t['slots'] / mib:.0f} MiB): {t['peak_rss'] / (floor + t['slots']):.2f}x"
    )
    print(
        f"  where it goes: interpreter + torch before the model {t['rss_start'] / mib:.0f} MiB; peak after "
        f"loading the base model {t['rss_loaded'] / mib:.0f} MiB; without the interpreter "
        f"{(t['peak_rss'] - t['rss_start']) / floor:.2f}x the floor"
    )


if __name__ == "__main__":
    main()
