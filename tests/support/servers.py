"""Real local servers for the worker's source tests: moto's S3 server and a small Hub-compatible endpoint.

Both listen on 127.0.0.1 only, on a free port, and are used with the REAL clients (boto3 with
endpoint_url, huggingface_hub with endpoint= / HF_ENDPOINT), so the code under test runs exactly
as against AWS S3 or huggingface.co.

Fixtures (import them into a test module: ``from support.servers import moto_s3, hf_hub``):
  moto_s3 (session)  MotoS3: .endpoint_url, .client (boto3), .bucket() -> a fresh bucket name,
                     .put_dir(bucket, prefix, dir) uploads an adapter directory.
  gcs (session)      FakeGcs: gcp-storage-emulator's server; .endpoint_url, .client (google-cloud-storage,
                     anonymous), .bucket() -> a fresh bucket name, .put_dir(bucket, prefix, dir).
  hf_hub             FakeHub: .url, .add_commit(repo, files, branch="main", tags=()) -> commit sha,
                     .delete_repo(repo), .token (require "Bearer <token>" when set), .chunk_delay_s
                     (throttle downloads), .requests (method, path, authorized) seen.
Helper: closed_url() -> an http://127.0.0.1:PORT URL where nothing listens (an unreachable endpoint).
"""

from __future__ import annotations

import hashlib
import http.server
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".bin")


def closed_url() -> str:
    """An endpoint where nothing listens: the port was free a moment ago and is closed now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# --- S3 (moto) -----------------------------------------------------------------------------------
@dataclass
class MotoS3:
    endpoint_url: str
    client: Any

    def bucket(self) -> str:
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(Bucket=name)
        return name

    def put_dir(self, bucket: str, prefix: str, directory: Path) -> None:
        for p in sorted(Path(directory).iterdir()):
            if p.is_file():
                self.client.upload_file(str(p), bucket, f"{prefix}/{p.name}" if prefix else p.name)


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    import boto3
    from moto.server import ThreadedMotoServer

    saved = {
        k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    try:
        yield MotoS3(url, boto3.session.Session().client("s3", endpoint_url=url, region_name="us-east-1"))
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# --- Google Cloud Storage (gcp-storage-emulator) -------------------------------------------------
@dataclass
class FakeGcs:
    endpoint_url: str
    client: Any

    def bucket(self) -> str:
        name = f"b-{uuid.uuid4().hex[:12]}"
        self.client.create_bucket(name)
        return name

    def put_dir(self, bucket: str, prefix: str, directory: Path) -> None:
        for p in sorted(Path(directory).iterdir()):
            if p.is_file():
                key = f"{prefix}/{p.name}" if prefix else p.name
                self.client.bucket(bucket).blob(key).upload_from_filename(str(p))


@pytest.fixture(scope="session")
def gcs() -> Iterator[FakeGcs]:
    from gcp_storage_emulator.server import create_server
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    logging.getLogger("gcp_storage_emulator").setLevel(logging.ERROR)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    url = f"http://127.0.0.1:{port}"
    client = storage.Client(
        project="test", credentials=AnonymousCredentials(), client_options={"api_endpoint": url}
    )
    try:
        yield FakeGcs(url, client)
    finally:
        server.stop()


# --- a Hub-compatible endpoint -------------------------------------------------------------------
@dataclass
class _File:
    path: Path
    size: int
    sha256: str
    blob_id: str
    lfs: bool


@dataclass
class FakeHub:
    """Repos with commits and branches on disk, served over the routes huggingface_hub calls."""

    root: Path
    url: str = ""
    token: str | None = None
    chunk_delay_s: float = 0.0
    chunk_bytes: int = 64 << 10
    refs: dict[str, dict[str, str]] = field(default_factory=dict)  # repo -> ref -> commit
    commits: dict[str, dict[str, dict[str, _File]]] = field(default_factory=dict)  # repo -> commit -> files
    requests: list[tuple[str, str, bool]] = field(default_factory=list)
    fail_next: int = 0  # answer the next N file downloads with HTTP 503
    active: int = 0  # file downloads in flight now
    max_active: int = 0  # the most file downloads ever in flight at once
    bytes_sent: int = 0  # file bytes written to clients (a download stopped early sends few)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add_commit(
        self,
        repo: str,
        files: dict[str, bytes | Path] | Path,
        *,
        branch: str = "main",
        tags: tuple[str, ...] = (),
    ) -> str:
        """Add a commit holding `files` (a dict, or every file of a directory); returns its sha."""
        if isinstance(files, Path):
            files = {p.name: p for p in sorted(files.iterdir()) if p.is_file()}
        sha = hashlib.sha1(f"{repo}\0{uuid.uuid4()}".encode()).hexdigest()
        stored: dict[str, _File] = {}
        for name, content in files.items():
            data = content.read_bytes() if isinstance(content, Path) else content
            dest = self.root / repo.replace("/", "--") / sha / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(data)
            blob = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
            stored[name] = _File(
                dest, len(data), hashlib.sha256(data).hexdigest(), blob, name.endswith(LFS_SUFFIXES)
            )
        with self._lock:
            self.commits.setdefault(repo, {})[sha] = stored
            refs = self.refs.setdefault(repo, {})
            for ref in (branch, *tags):
                refs[ref] = sha
        return sha

    def delete_repo(self, repo: str) -> None:
        with self._lock:
            self.refs.pop(repo, None)
            self.commits.pop(repo, None)

    def file_gets(self) -> list[str]:
        """Paths of the file downloads (GET /{repo}/resolve/...) seen so far."""
        return [p for m, p, _ in self.requests if m == "GET" and "/resolve/" in p]

    def lookup(self, repo: str, rev: str) -> tuple[str, dict[str, _File]] | None:
        with self._lock:
            commits = self.commits.get(repo)
            if commits is None:
                return None
            sha = self.refs[repo].get(rev, rev)
            files = commits.get(sha)
            return (sha, files) if files is not None else None


class _Handler(http.server.BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet: warnings are errors in tests
        pass

    def do_HEAD(self) -> None:
        self._serve(head=True)

    def do_GET(self) -> None:
        self._serve(head=False)

    def _error(self, status: int, code: str | None, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self, *, head: bool) -> None:
        hub = self.hub
        path = urlsplit(self.path).path
        auth = self.headers.get("Authorization")
        authorized = hub.token is not None and auth == f"Bearer {hub.token}"
        hub.requests.append((self.command, path, authorized))
        if hub.token is not None and not authorized:
            return self._error(401, None, "Invalid credentials in Authorization header")
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            repo = "/".join(parts[2:4])
            rev = parts[5] if len(parts) >= 6 and parts[4] == "revision" else "main"
            return self._model_info(repo, rev)
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._file("/".join(parts[:2]), parts[3], "/".join(parts[4:]), head=head)
        return self._error(404, None, f"no route for {path}")

    def _model_info(self, repo: str, rev: str) -> None:
        if repo not in self.hub.commits:
            return self._error(404, "RepoNotFound", "Repository not found")
        found = self.hub.lookup(repo, rev)
        if found is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        sha, files = found
        siblings = []
        for name, f in sorted(files.items()):
            s: dict[str, Any] = {"rfilename": name, "size": f.size, "blobId": f.blob_id}
            if f.lfs:
                s["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": 134}
            siblings.append(s)
        body = json.dumps({"_id": sha[:24], "id": repo, "modelId": repo, "sha": sha, "private": False,
                           "siblings": siblings, "tags": []}).encode()  # fmt: skip
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _file(self, repo: str, rev: str, name: str, *, head: bool) -> None:
        if repo not in self.hub.commits:
            return self._error(404, "RepoNotFound", "Repository not found")
        found = self.hub.lookup(repo, rev)
        if found is None:
            return self._error(404, "RevisionNotFound", "Invalid rev id")
        sha, files = found
        f = files.get(name)
        if f is None:
            return self._error(404, "EntryNotFound", f"{name} does not exist at {rev}")
        if not head and self.hub.fail_next > 0:
            with self.hub._lock:
                self.hub.fail_next -= 1
            return self._error(503, None, "Service temporarily unavailable")
        etag = f.sha256 if f.lfs else f.blob_id
        self.send_response(200)
        self.send_header("Content-Length", str(f.size))
        self.send_header("ETag", f'"{etag}"')
        self.send_header("X-Repo-Commit", sha)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if head:
            return
        with self.hub._lock:
            self.hub.active += 1
            self.hub.max_active = max(self.hub.max_active, self.hub.active)
        try:
            with open(f.path, "rb") as src:
                while chunk := src.read(self.hub.chunk_bytes):
                    self.wfile.write(chunk)
                    with self.hub._lock:
                        self.hub.bytes_sent += len(chunk)
                    if self.hub.chunk_delay_s:
                        self.wfile.flush()
                        time.sleep(self.hub.chunk_delay_s)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            with self.hub._lock:
                self.hub.active -= 1


def start_hub(root: Path, *, port: int = 0) -> tuple[FakeHub, http.server.ThreadingHTTPServer]:
    """Start a FakeHub on 127.0.0.1 (also usable from a script, e.g. the benchmark)."""
    hub = FakeHub(root)
    handler = type("Handler", (_Handler,), {"hub": hub})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, name="fake-hub", daemon=True).start()
    return hub, server


@pytest.fixture
def hf_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    hub, server = start_hub(tmp_path_factory.mktemp("hub"))
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
