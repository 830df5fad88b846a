"""API keys against a real worker process: hostile headers, keys in logs, bad key files (issue 18 §4).

One control-mode `loraplane-worker` subprocess (no model weights: auth, probes and /adapters are the
same in every mode) reads its keys from a file the test rewrites, as Kubernetes rewrites a mounted
Secret. Raw sockets send what the official clients refuse to send (non-UTF-8 bytes, broken request
lines); the worker's own log file is searched for the key.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from support import adapters as adapters_mod
from support import fleet

pytestmark = [pytest.mark.slow]

#: outside the bearer-token pattern redaction already knew (!, $): only the registered value masks it
KEY = "tenant!key$one"
NEW = "tenant!key$two-and-more"
MIB = 1 << 20


class Worker:
    def __init__(self, proc: fleet.WorkerProc, key_file: Path) -> None:
        self.proc, self.key_file = proc, key_file
        self.url = f"http://127.0.0.1:{proc.port}"

    def raw(self, request: bytes) -> tuple[int, bytes]:
        """Send bytes as they are; the status and body of the answer."""
        with socket.create_connection(("127.0.0.1", self.proc.port), timeout=10) as s:
            s.sendall(request)
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        return int(head.split()[1]), body

    def get(self, key: str) -> int:
        return httpx.get(
            self.url + "/adapters", headers={"Authorization": f"Bearer {key}"}, timeout=10
        ).status_code

    def write_keys(self, text: str | bytes) -> None:
        tmp = self.key_file.with_suffix(".new")  # replaced whole, as the kubelet swaps a Secret's files
        tmp.write_bytes(text if isinstance(text, bytes) else text.encode())
        tmp.replace(self.key_file)


@pytest.fixture(scope="module")
def worker(kube: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    kube.apply_crds()
    namespace = kube.create_namespace()
    tmp = tmp_path_factory.mktemp("keys")
    key_file = tmp / "api-keys"
    key_file.write_text(f"{KEY}\n")
    base = adapters_mod.write_base_config(tmp / "base")
    (tmp / "adapters").mkdir()
    proc = fleet.WorkerProc(
        kube.kubeconfig, tmp, name="keyed", namespace=namespace, base_dir=base, local_root=tmp / "adapters",
        extra=["--api-key-file", str(key_file)],
    )  # fmt: skip
    with proc:
        w = Worker(proc, key_file)
        fleet.wait_for(lambda: _status(w, "/ready") == 200, 60, lambda: f"worker ready\n{proc.log()[-3000:]}")
        yield w
    kube.delete_namespace(namespace)


def _status(w: Worker, path: str) -> int:
    try:
        return httpx.get(w.url + path, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def test_non_utf8_and_repeated_authorization_headers(worker: Worker) -> None:
    get = b"GET /adapters HTTP/1.1\r\nHost: w\r\nConnection: close\r\n"
    status, body = worker.raw(get + b"Authorization: Bearer \xff\xfe" + KEY.encode() + b"\r\n\r\n")
    assert (status, b'"InvalidApiKey"' in body) == (401, True)
    status, body = worker.raw(
        get + f"Authorization: Bearer {KEY}\r\nAuthorization: Bearer x\r\n\r\n".encode()
    )
    assert (status, b'"param":"Authorization"' in body) == (400, True), body
    both_good = f"Authorization: Bearer {KEY}\r\nAuthorization: Bearer {KEY}\r\n\r\n".encode()
    assert worker.raw(get + both_good)[0] == 400  # not even two of the same: which one a proxy saw is unknown
    assert worker.raw(get + f"Authorization: Bearer {KEY}\r\n\r\n".encode())[0] == 200
    assert "Traceback" not in worker.proc.log()


def test_broken_requests_carrying_a_key_never_log_it(worker: Worker) -> None:
    key = KEY.encode()
    broken = [
        b"Authorization: Bearer " + key + b"\r\n\r\n",  # headers without a request line
        b"GET /adapters Authorization: Bearer " + key + b"\r\n\r\n",  # a request line that ran on
        b"GET /adapters HTTP/1.1\r\nAuthorization: Bearer " + key + b"\x01\r\n\r\n",  # a control byte
        b"GET /adapters?api_key=" + key + b" HTTP/1.1 x\r\n\r\n",  # no header name: only its value masks it
    ]
    before = worker.proc.log().count("Error handling request")
    for request in broken:
        assert worker.raw(request)[0] == 400
    log = fleet.wait_for(
        lambda: (t := worker.proc.log()).count("Error handling request") >= before + 3 and t,
        10,
        "aiohttp's error lines",
    )
    assert KEY not in log and "api_key=***" in log


def test_a_key_file_over_1_mib_is_refused_and_the_keys_kept(worker: Worker) -> None:
    # A key line that crosses the limit: read up to 1 MiB, its first 14 characters were a key.
    pad = b"#" * (MIB - 15) + b"\n"
    worker.write_keys(pad + NEW.encode() + b"\n")
    try:
        fleet.wait_for(
            lambda: worker.get(KEY) == 200 and f"over {MIB} bytes" in worker.proc.log(),
            10,
            lambda: f"the refusal\n{worker.proc.log()[-2000:]}",
        )
        assert worker.get(NEW[:14]) == 401 and worker.get(NEW) == 401
        assert "WARNING" in next(
            line for line in worker.proc.log().splitlines() if f"over {MIB} bytes" in line
        )
    finally:
        worker.write_keys(f"{KEY}\n")


def test_an_empty_key_file_warns_and_ready_says_why(worker: Worker) -> None:
    worker.write_keys("# all keys removed\n")
    try:

        def not_ready() -> Any:
            r = httpx.get(worker.url + "/ready", timeout=5)
            return r.status_code == 503 and r.json()

        body = fleet.wait_for(not_ready, 10, lambda: f"/ready 503\n{worker.proc.log()[-2000:]}")
        assert any("holds no keys" in p for p in body["problems"]), body
        assert worker.get(KEY) == 401
        assert any("WARNING" in line and "holds no keys" in line for line in worker.proc.log().splitlines())
    finally:
        worker.write_keys(f"{KEY}\n")
    fleet.wait_for(lambda: _status(worker, "/ready") == 200 and worker.get(KEY) == 200, 10, "ready again")
