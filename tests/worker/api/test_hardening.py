"""A tenant's worst requests against a real worker process serving others at the same time.

One `loraplane-worker --mode serve` subprocess (tiny Llama on CPU, one adapter given its ID by the
test in the operator's place) takes every attack below through real HTTP while other tenants'
requests run beside them: each attack fails alone with its own 4xx, every concurrent good request
succeeds with the same greedy text as before, and the worker stays healthy. API keys are checked with
the official openai client, key rotation through the key file the chart mounts from a Secret.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from support import fleet
from support.api import BASE

pytestmark = [pytest.mark.slow]

KEYS = ("tenant-key-old", "tenant-key-new")
ADAPTER = "sql"
GOOD = {"prompt": "select name from users", "max_tokens": 8, "temperature": 0}


class Worker:
    def __init__(self, proc: fleet.WorkerProc, key_file: Path) -> None:
        self.proc, self.key_file = proc, key_file
        self.url = f"http://127.0.0.1:{proc.port}"

    def post(
        self, path: str, body: Any, key: str = KEYS[0], headers_extra: dict[str, str] | None = None
    ) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {
            "Authorization": f"Bearer {key}",
            "Content-Type": "application/json",
            **(headers_extra or {}),
        }
        return httpx.post(self.url + path, content=content, headers=headers, timeout=60)

    def client(self, key: str = KEYS[0]) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def worker(kube: Any, tiny_llama: Path, adapters: dict[str, Path], tmp_path_factory: Any) -> Iterator[Worker]:
    kube.apply_crds()
    namespace = kube.create_namespace()
    tmp = tmp_path_factory.mktemp("hardening")
    key_file = tmp / "api-keys"
    key_file.write_text(f"# rotated by the test\n{KEYS[0]}\n")
    ads = fleet.Adapters(kube, namespace)
    proc = fleet.WorkerProc(
        kube.kubeconfig, tmp, name="hardened", namespace=namespace, base_dir=tiny_llama,
        local_root=adapters["a0"].parent,
        extra=["--mode", "serve", "--device", "cpu", "--max-loras", "2", "--api-key-file", str(key_file),
               "--client-timeout-seconds", "1"],
    )  # fmt: skip
    with proc:
        ads.create(fleet.adapter_obj(ADAPTER, str(adapters["a0"])))
        ads.assign(ADAPTER, 7)
        w = Worker(proc, key_file)
        fleet.wait_for(lambda: _ready(w), 120, lambda: f"worker ready\n{proc.log()[-3000:]}")
        yield w
    ads.close()
    kube.delete_namespace(namespace)


def _ready(w: Worker) -> bool:
    try:
        if httpx.get(w.url + "/ready", timeout=2).status_code != 200:
            return False
        return ADAPTER in {m.id for m in w.client().models.list()}
    except (httpx.HTTPError, openai.APIError):
        return False


def _nested(depth: int) -> bytes:
    return b'{"model": "sql", "prompt": ' + b"[" * depth + b"1" + b"]" * depth + b"}"


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": ADAPTER, **GOOD, **fields}


#: (name, path, body, status, reason (None: any), param (None: not checked))
ATTACKS: list[tuple[str, str, Any, int, str | None, str | None]] = [
    ("seed 2**70", "/v1/completions", _body(seed=2**70, temperature=1), 400, "InvalidRequest", "seed"),
    ("seed -2**64", "/v1/completions", _body(seed=-(2**64), temperature=1), 400, "InvalidRequest", "seed"),
    ("max_tokens 2**40", "/v1/completions", _body(max_tokens=2**40), 400, "InvalidRequest", "max_tokens"),
    ("max_tokens 0", "/v1/completions", _body(max_tokens=0), 400, "InvalidRequest", "max_tokens"),
    ("max_tokens '10'", "/v1/completions", _body(max_tokens="10"), 400, "InvalidRequest", "max_tokens"),
    ("max_tokens true", "/v1/completions", _body(max_tokens=True), 400, "InvalidRequest", "max_tokens"),
    ("temperature NaN", "/v1/completions", b'{"model": "sql", "prompt": "x", "temperature": NaN}', 400,
     "InvalidJson", None),
    ("temperature 1e999", "/v1/completions", b'{"model": "sql", "prompt": "x", "temperature": 1e999}', 400,
     "InvalidRequest", "temperature"),
    ("top_p 0", "/v1/completions", _body(top_p=0), 400, "InvalidRequest", "top_p"),
    ("top_k 2**40", "/v1/completions", _body(top_k=2**40), 400, "InvalidRequest", "top_k"),
    ("n 10**6", "/v1/completions", _body(n=10**6), 400, None, "n"),
    ("stop x5000", "/v1/completions", _body(stop=[f"s{i}" for i in range(5000)]), 400, "InvalidRequest", "stop"),
    ("stop 10k chars", "/v1/completions", _body(stop="y" * 10_000), 400, "InvalidRequest", "stop"),
    ("logprobs 10**9", "/v1/completions", _body(logprobs=10**9), 400, None, "logprobs"),
    ("logit_bias 20k", "/v1/completions", _body(logit_bias={str(i): 100 for i in range(20_000)}), 400, None,
     "logit_bias"),
    ("unknown field", "/v1/completions", _body(frobnicate=1), 400, "UnknownParameter", "frobnicate"),
    ("prompt 900 KiB", "/v1/completions", _body(prompt="lorem ipsum " * 75_000), 400, "PromptTooLong", "prompt"),
    ("chat 10k messages", "/v1/chat/completions",
     {"model": ADAPTER, "messages": [{"role": "user", "content": "hi there"}] * 10_000}, 400, "PromptTooLong",
     "messages"),
    ("body 2 MiB", "/v1/completions", _body(prompt="z" * (2 << 20)), 413, "RequestTooLarge", None),
    ("nesting 100k", "/v1/completions", _nested(100_000), 400, "InvalidJson", None),
    ("nesting 40", "/v1/completions", _nested(40), 400, "InvalidJson", None),
    ("invalid UTF-8", "/v1/completions", b'{"model": "sql", "prompt": "\xff\xfe\xc3"}', 400, "InvalidJson", None),
    ("raw control bytes", "/v1/completions", b'{"model": "sql", "prompt": "a\x00\x07b"}', 400, "InvalidJson", None),
    ("lone surrogate", "/v1/completions", b'{"model": "sql", "prompt": "a\\ud800b"}', 400, "InvalidJson", None),
    ("5000-digit int", "/v1/completions", b'{"model": "sql", "prompt": [' + b"9" * 5000 + b"]}", 400,
     "InvalidJson", None),
    ("token 2**40", "/v1/completions", _body(prompt=[1, 2**40]), 400, "InvalidRequest", "prompt"),
    ("token 99999", "/v1/completions", _body(prompt=[1, 99_999]), 400, "TokenOutOfRange", "prompt"),
    ("image part", "/v1/chat/completions",
     {"model": ADAPTER, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     400, "InvalidRequest", "messages"),
    ("model 1000 chars", "/v1/completions", _body(model="m" * 1000), 400, "InvalidRequest", "model"),
    ("top-level array", "/v1/completions", b"[]", 400, "InvalidRequest", None),
    ("empty body", "/v1/completions", b"", 400, "InvalidJson", None),
]  # fmt: skip


class Tenants:
    """Other tenants: greedy requests for the adapter and the base model in a loop (bounded), each
    checked against the text the same request got before any attack."""

    def __init__(self, w: Worker) -> None:
        self.client = w.client()
        self.want = {m: self._one(m) for m in (ADAPTER, BASE)}
        self.done = threading.Event()
        self.results: list[tuple[str, str | BaseException]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _one(self, model: str) -> str:
        return self.client.completions.create(model=model, **GOOD).choices[0].text

    def _run(self) -> None:
        deadline = time.monotonic() + 240
        while not self.done.is_set() and time.monotonic() < deadline and len(self.results) < 2000:
            for model in self.want:
                try:
                    self.results.append((model, self._one(model)))
                except Exception as exc:
                    self.results.append((model, exc))

    def __enter__(self) -> Tenants:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(60)
        bad = [(m, r) for m, r in self.results if r != self.want[m]]
        assert self.results and not bad, (
            f"{len(bad)} of {len(self.results)} tenant requests failed: {bad[:3]}"
        )


def test_each_attack_fails_alone_with_its_own_4xx(worker: Worker) -> None:
    with Tenants(worker):
        for name, path, body, status, reason, param in ATTACKS:
            r = worker.post(path, body)
            assert r.status_code == status, (name, r.text[:300])
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}, name
            assert reason is None or error["type"] == reason, (name, error)
            assert param is None or error["param"] == param, (name, error)
        # A gzip bomb: 1 KiB on the wire, 64 MiB inflated; reading stops at the body cap.
        bomb = gzip.compress(b'{"model": "sql", "prompt": "' + b" " * (64 << 20) + b'"}')
        r = worker.post("/v1/completions", bomb, headers_extra={"Content-Encoding": "gzip"})
        assert r.status_code == 413 and r.json()["error"]["type"] == "RequestTooLarge", r.text[:300]
        # Escaped control characters are valid JSON and valid text: served like any prompt.
        r = worker.post("/v1/completions", _body(prompt="a\u0000\u0007b"))
        assert r.status_code == 200, r.text
    assert httpx.get(worker.url + "/health").status_code == 200


def test_slow_and_stalled_clients_hold_nothing(worker: Worker) -> None:
    body = json.dumps(_body(stream=True, max_tokens=200, ignore_eos=True)).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS[0]}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with Tenants(worker):
        # A body that trickles in and stops: 408 once --client-timeout-seconds passes.
        with socket.create_connection(("127.0.0.1", worker.proc.port), timeout=30) as slow:
            slow.sendall(head + body[:10])
            answer = slow.recv(4096).decode(errors="replace")
        assert answer.startswith("HTTP/1.1 408"), answer[:200]
        assert '"RequestTimeout"' in answer
        # Connections that send half a request line and stop (slowloris): they hold a socket each, no more.
        idle = [socket.create_connection(("127.0.0.1", worker.proc.port), timeout=30) for _ in range(200)]
        for c in idle:
            c.sendall(b"POST /v1/comp")
        # Streams whose clients never read: the engine finishes them, tenants are served meanwhile.
        stalled = []
        for _ in range(4):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            s.connect(("127.0.0.1", worker.proc.port))
            s.sendall(head + body)
            stalled.append(s)
        time.sleep(2)
    for s in stalled:
        assert s.recv(12) == b"HTTP/1.1 200"  # they were streaming
        s.close()
    for c in idle:
        c.close()
    fleet.wait_for(
        lambda: (
            _gauge(worker, "vllm:num_requests_running") == _gauge(worker, "vllm:num_requests_waiting") == 0
        ),
        30,
        "the stalled streams to leave the engine",
    )


def _gauge(w: Worker, name: str) -> float | None:
    values = [v for k, v in w.proc.metrics().items() if k == name or k.startswith(name + "{")]
    return sum(values) if values else None


def test_api_keys_with_the_openai_client_and_rotation(worker: Worker) -> None:
    with pytest.raises(openai.AuthenticationError) as wrong:
        worker.client("tenant-key-wrong").models.list()
    assert wrong.value.status_code == 401 and wrong.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        worker.client(KEYS[1]).completions.create(model=ADAPTER, **GOOD)  # not issued yet
    assert worker.client(KEYS[0]).completions.create(model=ADAPTER, **GOOD).choices[0].text

    # Rotation: the Secret now holds both keys (the kubelet rewrites the mounted file); both work.
    worker.key_file.write_text(f"{KEYS[0]}\n{KEYS[1]}\n")
    fleet.wait_for(lambda: _authorized(worker, KEYS[1]), 10, "the new key to be accepted")
    for key in KEYS:
        assert worker.client(key).completions.create(model=ADAPTER, **GOOD).choices[0].text
    # Then the old key is retired.
    worker.key_file.write_text(f"{KEYS[1]}\n")
    fleet.wait_for(lambda: not _authorized(worker, KEYS[0]), 10, "the old key to be refused")
    with pytest.raises(openai.AuthenticationError):
        worker.client(KEYS[0]).models.list()
    worker.key_file.write_text(f"{KEYS[0]}\n")  # back for the other tests
    fleet.wait_for(lambda: _authorized(worker, KEYS[0]), 10, "the first key again")

    # Probes and scrapes stay open; /adapters (source paths, messages) and /v1 do not.
    for path in ("/health", "/ready", "/metrics"):
        assert httpx.get(worker.url + path).status_code == 200, path
    # Spellings that reach the same routes need the key too.
    for path in ("/adapters/", "//adapters", "/%61dapters", "/metrics/../adapters", "/health/../v1/models"):
        assert httpx.get(worker.url + path).status_code in (401, 404), path
    for path in ("/adapters", "/v1/models"):
        r = httpx.get(worker.url + path)
        assert r.status_code == 401 and r.headers["WWW-Authenticate"] == "Bearer", path
        assert r.json()["error"]["type"] == "InvalidApiKey"
        assert httpx.get(worker.url + path, headers={"Authorization": f"Basic {KEYS[0]}"}).status_code == 401
    listed = httpx.get(worker.url + "/adapters", headers={"Authorization": f"Bearer {KEYS[0]}"}).json()
    assert [a["id"] for a in listed] == [7]


def _authorized(w: Worker, key: str) -> bool:
    return httpx.get(w.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
