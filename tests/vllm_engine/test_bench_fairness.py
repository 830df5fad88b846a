"""bench_fairness.py runs end to end in a small configuration, both engines, FCFS and fair, both scenarios
(the figures are printed, never asserted; the full run and its figures are in docs/benchmarks.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_bench_fairness_runs_and_prints_its_figures() -> None:
    small = ["--hidden", "128", "--layers", "1", "--max-num-seqs", "4", "--seconds", "2", "--warmup", "1"]
    small += ["--aggressor-clients", "4", "--long-tokens", "32", "--long-prompt", "16"]
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_fairness.py"), *small],
        capture_output=True,
        text=True,
        timeout=1400,
        cwd=BENCH.parent,
    )
    assert proc.returncode == 0, f"bench_fairness.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    table = proc.stdout.split("throughput fair / FCFS:")[-1]
    for engine in ("builtin", "vllm"):
        for scenario in ("two adapters", "two keys, one adapter"):
            row = next(
                (line for line in table.splitlines() if line.split()[:1] == [engine] and scenario in line),
                None,
            )
            assert row is not None, f"no {engine} / {scenario} row:\n{proc.stdout[-3000:]}"
            assert len(row.split("x")) == 5, row  # four TTFT ratios and the throughput ratio
