"""bench_vs_vllm.py runs end to end in a small configuration: vLLM's own OpenAI server (with and without
loraplane's plugin), the worker with ``--engine vllm`` and with the built-in engine, on one tiny
checkpoint (the figures are printed, never asserted; the full-size run and its figures are in
docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_bench_vs_vllm_runs_and_prints_its_figures() -> None:
    small = ["--hidden", "128", "--layers", "1", "--adapters", "2", "--max-loras", "2", "--clients", "2"]
    small += ["--requests", "4", "--max-tokens", "4", "--rounds", "1", "--start-timeout", "900"]
    small += ["--servers", "vllm-serve,vllm-bare,worker-vllm,worker-builtin"]
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_vs_vllm.py"), *small],
        capture_output=True,
        text=True,
        timeout=1400,
        cwd=BENCH.parent,
    )
    assert proc.returncode == 0, f"bench_vs_vllm.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for line in (
        "worker-vllm / vllm-serve (lora)",
        "worker-vllm / vllm-serve (base)",
        "worker-vllm / vllm-bare (lora)",
        "vllm-serve / vllm-bare (base)",
        "peak RSS",
        "LoRA / base",
    ):
        assert line in proc.stdout, f"bench_vs_vllm.py did not print {line!r}:\n{proc.stdout[-3000:]}"
