"""Subprocesses the integration tests run (the operator, the worker) and bounded polling.

wait_for(fn, timeout, what)   poll until fn() is truthy (bounded), returning its value
scaled(seconds)               a bound on a wait, times TIMEOUT_SCALE (env LORAPLANE_TEST_TIMEOUT_SCALE)
free_port()                   a TCP port on 127.0.0.1 that was free a moment ago
OperatorProc                  `python -m loraplane.operator.main`, scoped to a namespace or given its flags
WorkerProc                    a `loraplane-worker` subprocess in control mode with its own cache dir and log
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
#: The served model name a control-mode worker announces (and adapters name as their baseModel).
BASE_MODEL = "tiny-llama"
#: Every bound on a wait in the suite is multiplied by this. The bounds are written for a quiet machine;
#: on a loaded 2-core CI machine a process start, a heartbeat or a status write takes several times
#: longer. A wait returns as soon as its condition holds, so a larger bound costs a passing test nothing.
TIMEOUT_SCALE = float(os.environ.get("LORAPLANE_TEST_TIMEOUT_SCALE", "3"))


def scaled(seconds: float) -> float:
    """The bound on a wait of `seconds` on a quiet machine, times TIMEOUT_SCALE."""
    return seconds * TIMEOUT_SCALE


def wait_for(fn: Callable[[], T], timeout: float, what: str | Callable[[], str], interval: float = 0.1) -> T:
    """fn() until it returns something truthy; AssertionError naming `what` (and the last value) on timeout.

    `timeout` is for a quiet machine: the wait is bounded by scaled(timeout). `what` may be a callable
    (e.g. returning a worker's log tail), evaluated only on failure."""
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = fn()
        if last:
            return last
        if time.monotonic() > deadline:
            text = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {text}; last value: {last!r}")
        time.sleep(interval)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OperatorProc:
    """One `python -m loraplane.operator.main` subprocess with its log in a file.

    OperatorProc(kubeconfig, namespace, log_path) watches `namespace` only, with its ID ledger there, short
    liveness checks and `heartbeat_window`; OperatorProc(kubeconfig, None, log_path, args=[...]) runs with
    exactly the flags given (the operator tests build their own scope). Use start()/stop() or `with`.
    """

    def __init__(
        self,
        kubeconfig: str,
        namespace: str | None,
        log_path: Path,
        *,
        heartbeat_window: float = 10,
        args: Sequence[str] = (),
    ) -> None:
        scope = []
        if namespace is not None:
            scope = [
                "--namespace", namespace,
                "--ledger-namespace", namespace,
                "--liveness-interval", "0.5",
                "--heartbeat-window", str(heartbeat_window),
            ]  # fmt: skip
        self.cmd = [
            sys.executable, "-m", "loraplane.operator.main",
            "--kubeconfig", kubeconfig,
            "--metrics-port", "0",
            *scope,
            *args,
        ]  # fmt: skip
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> OperatorProc:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(scaled(10))

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within scaled(10) s."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(scaled(10))
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> OperatorProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class WorkerProc:
    """One `loraplane-worker` subprocess with its own cache dir (kept across restarts) and log file."""

    def __init__(
        self,
        kubeconfig: str,
        workdir: Path,
        *,
        name: str,
        namespace: str,
        base_dir: Path,
        local_root: Path,
        served_model: str = BASE_MODEL,
        extra: list[str] | None = None,
        env: dict[str, str] | None = None,
        watch: Sequence[str] | None = None,
    ) -> None:
        """`watch`: the namespaces whose adapters it serves, by default its own; () for all namespaces.
        Scoped, it never sees another test's adapters (on a real cluster a deleted namespace stays
        Terminating for seconds, adapters included)."""
        self.name, self.namespace = name, namespace
        scope = [namespace] if watch is None else list(watch)
        self.dir = Path(workdir) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cache_dir = self.dir / "cache"
        self.log_path = self.dir / "worker.log"
        self.port = free_port()
        self.args = [
            sys.executable, "-m", "loraplane.worker.main",
            "--kubeconfig", kubeconfig,
            "--base-model", str(base_dir),
            "--served-model-name", served_model,
            "--cache-dir", str(self.cache_dir),
            "--cache-bytes", str(256 << 20),
            "--local-roots", str(local_root),
            "--worker-name", name,
            "--pod-namespace", namespace,
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--heartbeat-seconds", "2",
            "--report-batch-seconds", "0.1",
            "--log-level", "INFO",
            "--mode", "control",  # a config-only model: no weights to serve
            *(["--namespaces", ",".join(scope)] if scope else []),
            *(extra or []),
        ]  # fmt: skip
        self.env = {**os.environ, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> WorkerProc:
        assert not self.alive(), f"worker {self.name} is already running"
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metrics(self) -> dict[str, float]:
        """Samples from /metrics: 'name{labels}' -> value (empty while the server is not up)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=2) as resp:
                text = resp.read().decode()
        except OSError:
            return {}
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def metric(self, key: str) -> float:
        return self.metrics().get(key, 0.0)

    def stop(self, timeout: float = 15) -> int:
        """SIGTERM and wait (at most scaled(timeout)); returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        timeout = scaled(timeout)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(scaled(5))
            raise AssertionError(
                f"worker {self.name} did not stop on SIGTERM within {timeout}s:\n{self.log()[-3000:]}"
            ) from None

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(scaled(10))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> WorkerProc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(scaled(10))
