"""Every benchmark script runs end to end in a small configuration (the figures are printed, never asserted).

Benchmarks are scripts that print ratios measured side by side; this keeps them working as the code
moves. The full-size runs and their figures are in the issue notes and docs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"

RUNS = {
    # script: (small arguments, lines the output must carry)
    "bench_allocation.py": (
        ["--n", "20", "--clients", "2"],
        ["raw single-client PATCH/s", "x raw PATCH/s", "API writes per ID"],
    ),
    "bench_worker.py": (["--n", "5"], ["p99"]),
    "bench_bbr.py": (
        ["--n", "40", "--window", "0.2", "--recompute", "100"],
        ["ConfigMap writes", "ratio 20N/N: build"],
    ),
    "bench_scale.py": (
        ["--points", "20:1,60:1", "--timeout", "120", "--replicas", "1", "--delete"],
        [
            "CPU ms per adapter operator",
            "KiB per adapter",
            "writes per adapter by kind",
            "delete all: operator",
        ],
    ),
    "bench_placement.py": (
        ["--n", "40", "--workers", "3", "--heartbeat-window", "4", "--timeout", "120"],
        ["target 27 +-20%", "downloads in total 80", "moved on kill", "moved on its return", "moved on add"],
    ),
    # The built-in engine only here; vLLM's side runs where vLLM is (.venv-vllm), see docs/benchmarks.md.
    "bench_engines.py": (
        ["--engines", "builtin", "--hidden", "128", "--layers", "1", "--adapters", "2", "--clients", "2"]
        + ["--requests", "4", "--max-tokens", "4", "--rounds", "1"],
        ["LoRA / base"],
    ),
    "bench_prefetch.py": (["--mb", "4", "--repeat", "1", "--kinds", "local,s3"], ["ratio"]),
    "bench_provenance.py": (["--mb", "4", "--repeat", "1"], ["digest+verify / prefetch", "library verify /"]),
    "bench_engine.py": (
        ["--rounds", "1", "--prefill-rounds", "1", "--no-peft", "--hidden", "256", "--layers", "1"],
        ["ours/base", "device bytes per slot"],
    ),
    "bench_serving.py": (
        [
            "--rounds",
            "1",
            "--requests",
            "12",
            "--adapters",
            "8",
            "--batch",
            "4",
            "--output-len",
            "4",
            "--prompt-len",
            "8",
        ],
        ["tiered / resident", "peak RSS"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("script", sorted(RUNS))
def test_benchmark_runs_and_prints_its_figures(script: str) -> None:
    args, expected = RUNS[script]
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=BENCH.parent,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for line in expected:
        assert line in proc.stdout, f"{script} did not print {line!r}:\n{proc.stdout[-3000:]}"
