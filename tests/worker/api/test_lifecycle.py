"""What the worker tells Kubernetes: liveness follows the engine loop, readiness follows what it can
take, and SIGTERM drains.

Liveness drives a real engine inside a real HTTP server: its loop is held (a stall) and then its
thread ended (a death), and /health, /ready and new requests must say so. The drain runs a real
`loraplane-worker` process with a stream in flight and sends it a real SIGTERM.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import fleet, models
from support.api import BASE, MakeServer

pytestmark = [pytest.mark.slow]
STALL_S = fleet.scaled(1.5)


def _probe(url: str, path: str) -> tuple[int, dict[str, Any]]:
    r = httpx.get(url + path, timeout=10)
    return r.status_code, r.json()


def test_health_follows_the_engine_loop(make_server: MakeServer) -> None:
    # An idle loop comes round once a second (scheduler.run_once): the stall limit must be well above
    # that, with room for a loaded machine that does not run the engine thread for a while.
    s = make_server(engine_stall_seconds=STALL_S)
    body = {"model": BASE, "prompt": "hello", "max_tokens": 4, "temperature": 0}
    assert _probe(s.url, "/health") == (200, {"status": "ok"})
    assert _probe(s.url, "/ready")[0] == 200

    # A stall: the engine loop cannot come round (its lock is held, as a hung step would).
    scheduler = s.engine.scheduler
    with scheduler._cond:
        status, health = fleet.wait_for(
            lambda: (p := _probe(s.url, "/health"))[0] == 503 and p,
            STALL_S + 10,
            "/health to fail in the stall",
        )
        assert "has not come round" in health["problems"][0]
        assert _probe(s.url, "/ready")[0] == 503
        r = httpx.post(s.url + "/v1/completions", json=body, timeout=10)
        assert r.status_code == 503 and r.json()["error"]["type"] == "EngineUnavailable", r.text
    # The stall ends: healthy again and serving.
    fleet.wait_for(lambda: _probe(s.url, "/health")[0] == 200, 10, "/health to recover")
    assert httpx.post(s.url + "/v1/completions", json=body, timeout=30).status_code == 200

    # A death: the engine thread ends. /health fails (the kubelet restarts the pod), /ready too, and
    # requests are refused at once instead of waiting on a loop that will never take them.
    scheduler.stop()
    s.engine._thread.join(fleet.scaled(10))
    status, health = _probe(s.url, "/health")
    assert status == 503 and health["problems"] == ["the engine thread is not running"]
    assert _probe(s.url, "/ready")[0] == 503
    r = httpx.post(s.url + "/v1/completions", json=body, timeout=10)
    assert r.status_code == 503 and "engine thread is not running" in r.json()["error"]["message"]


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Room for a stream long enough to still run when SIGTERM arrives.
    return models.make_tiny_llama(tmp_path_factory.mktemp("drain") / BASE, max_position_embeddings=2048)


def _stream(url: str, max_tokens: int, events: list[dict[str, Any]], first: threading.Event) -> None:
    body = {"model": BASE, "prompt": "once", "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append({"done": True} if line == "data: [DONE]" else json.loads(line[6:]))
                first.set()


def _worker(kube: Any, tmp_path: Path, model: Path, drain: str, namespace: str) -> fleet.WorkerProc:
    return fleet.WorkerProc(
        kube.kubeconfig, tmp_path, name="drained", namespace=namespace, base_dir=model, local_root=tmp_path,
        extra=["--mode", "serve", "--device", "cpu", "--drain-seconds", drain],
    )  # fmt: skip


@pytest.mark.parametrize("drain", ["60", "0.5"], ids=["finishes", "deadline"])
def test_sigterm_drains_streams_in_flight(
    kube: Any, namespace: str, long_model: Path, tmp_path: Path, drain: str
) -> None:
    """Streams in flight run to their end within the drain; cut at the deadline (4 at once), each one
    ends with a ShuttingDown event and [DONE], never silently (tests/vllm_engine has the vLLM twin)."""
    kube.apply_crds()
    max_tokens = 1000
    streams = 1 if drain == "60" else 4
    with _worker(kube, tmp_path, long_model, drain, namespace) as w:
        url = f"http://127.0.0.1:{w.port}"
        fleet.wait_for(lambda: _up(url), 120, lambda: f"worker ready\n{w.log()[-3000:]}")
        events: list[list[dict[str, Any]]] = [[] for _ in range(streams)]
        first = [threading.Event() for _ in range(streams)]
        readers = [
            threading.Thread(target=_stream, args=(url, max_tokens, events[i], first[i]), daemon=True)
            for i in range(streams)
        ]
        for reader in readers:
            reader.start()
        assert all(f.wait(fleet.scaled(30)) for f in first), "the streams did not start"
        w.proc.send_signal(15)  # SIGTERM, as the kubelet sends it
        # At once: not ready, and new requests are refused with a reason while the stream goes on. With a
        # 0.5 s drain the server may be gone before a loaded machine polls: not answering is not ready too.
        not_ready = (503,) if drain == "60" else (503, 0)
        fleet.wait_for(lambda: _status(url + "/ready") in not_ready, 5, "/ready to drop")
        if drain == "60":
            r = httpx.post(url + "/v1/completions", json={"model": BASE, "prompt": "x"}, timeout=10)
            assert r.status_code == 503 and r.json()["error"]["type"] == "ShuttingDown"
            assert int(r.headers["Retry-After"]) > 0
            assert not any("done" in e for e in events[0]), "the stream ended before the drain was checked"
        for reader in readers:
            reader.join(fleet.scaled(120))
        code = w.proc.wait(fleet.scaled(60))
    assert code == 0, w.log()[-3000:]
    for got in events:
        assert got[-1] == {"done": True}
    if drain == "60":  # the stream ran to its end
        texts = [e for e in events[0] if "choices" in e]
        assert texts[-1]["choices"][0]["finish_reason"] == "length"
        assert "drained: no requests in flight" in w.log()
    else:  # cut at the deadline: each stream says why
        for got in events:
            assert got[-2].get("error", {}).get("type") == "ShuttingDown", got[-3:]
        assert f"drain deadline reached with {streams} requests still in flight" in w.log()


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def _up(url: str) -> bool:
    return _status(url + "/ready") == 200
