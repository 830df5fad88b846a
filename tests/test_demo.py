"""`loraplane demo --keep-running` as a user runs it: what it prints is readable and true, and the stack
it leaves up answers kubectl and the OpenAI API until Ctrl-C."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from loraplane import demo

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_demo_story_and_keep_running(tmp_path: Path) -> None:
    cmd = [
        str(Path(sys.executable).parent / "loraplane"),
        "demo",
        "--workdir",
        str(tmp_path),
        "--keep-running",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    running = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops everything" in line:  # the last line of the how-to-reach-it block
                running.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert running.wait(480) or proc.poll() is not None, "".join(lines)[-4000:]
        out = "".join(lines)
        assert running.is_set(), out[-4000:]
        # The stack is still up: the API answers on the printed URL, kubectl with the printed kubeconfig.
        api = re.search(r"curl -s (http://127\.0\.0\.1:\d+)/v1/models", out).group(1)
        listed = json.load(urllib.request.urlopen(f"{api}/v1/models", timeout=10))
        assert {m["id"] for m in listed["data"]} >= {"tiny-llama", "sql", "fox", "greeter"}
        kubeconfig = re.search(r"export KUBECONFIG=(\S+)", out).group(1)
        if shutil.which("kubectl"):
            table = subprocess.run(
                ["kubectl", "get", "lora", "-n", "demo"],
                env={**os.environ, "KUBECONFIG": kubeconfig},
                capture_output=True,
                text=True,
                timeout=30,
            ).stdout
            assert "Ready" in table, table
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    reader.join(10)
    out = "".join(lines)
    assert "stopped" in out.splitlines()[-1]

    # /v1/models names each model's base model (the API's baseModel field), never None.
    models_block = out.split("GET /v1/models", 1)[1].split("==>", 1)[0]
    assert "base model=None" not in models_block
    assert models_block.count("base model=tiny-llama") == 4, models_block
    # Each adapter answers with exactly what it was trained on, to its end (no mid-word cut).
    for name, completion in demo.ADAPTERS.items():
        assert re.search(rf'^\s+{name}\s+-> "{re.escape(completion)}"$', out, re.MULTILINE), (
            name,
            out[-3000:],
        )
    assert "(cut at" not in out
    assert re.search(r'^\s+sql \(new ID\) -> "the quick brown fox', out, re.MULTILINE)
    # Nothing unreadable reaches the terminal, and no library noise interleaves with the story.
    assert all(c.isprintable() or c == "\n" for c in out), [
        c for c in out if not (c.isprintable() or c == "\n")
    ]
    for noise in ("Warning", "warnings.warn", "it/s]", "%|"):
        assert noise not in out, noise
    # Training time is measured and printed, not promised.
    assert len(re.findall(r"training adapter '\w+' on CPU .* \d+\.\d s \(kept in", out)) == 3
    if shutil.which(
        "kubectl"
    ):  # kubectl get loraworkers -A: NAMESPACE NAME BASE-MODEL READY FAILED LOADING ASSIGNED ON-DEVICE ...
        row = next(line for line in out.splitlines() if line.startswith("loraplane-system"))
        assert int(row.split()[7]) >= 1, row  # ON DEVICE right after serving


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _start_demo(workdir: Path) -> tuple[subprocess.Popen[str], list[int]]:
    """`loraplane demo --keep-running` up to its how-to block; the operator's and worker's pids."""
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "loraplane"), "demo", "--workdir", str(workdir), "--keep-running"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    out = ""
    for line in proc.stdout:
        out += line
        if "Ctrl-C stops everything" in line:
            break
    pids = [int(p) for p in re.findall(r"started (?:operator|worker) \(pid (\d+)\)", out)]
    assert len(pids) == 2 and all(map(_alive, pids)), out[-3000:]
    return proc, pids


def _gone_within(pids: list[int], seconds: float) -> float:
    started = time.monotonic()
    while any(map(_alive, pids)) and time.monotonic() - started < seconds:
        time.sleep(0.1)
    assert not any(map(_alive, pids)), [p for p in pids if _alive(p)]
    return time.monotonic() - started


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_sigterm_and_sigkill_take_the_operator_and_worker_with_the_demo(tmp_path: Path) -> None:
    """Issue 18: SIGTERM left the operator and worker running, orphaned; so did SIGKILL, for half an hour
    against a dead API server; SIGINT stopped them one after the other (15 s each at worst)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):  # the second run reuses the models made by the first
        proc, pids = _start_demo(tmp_path)
        try:
            started = time.monotonic()
            proc.send_signal(sig)
            proc.wait(30)
            took = _gone_within(pids, 30)
            print(f"{sig.name}: demo and its processes gone in {time.monotonic() - started:.1f} s")
            if sig == signal.SIGTERM:
                assert proc.returncode == 0 and took < 1  # the demo waited for them
        finally:
            for pid in [p for p in pids if _alive(p)]:
                os.kill(pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
