"""gs:// sources with the real google-cloud-storage client against gcp-storage-emulator on 127.0.0.1.

The kind was added as a plug-in (worker/sources/gcs.py, its row in crds/paths.py, its name in
sources.SOURCES); these tests also show that its settings arrived as worker flags without settings.py
knowing the kind.
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import pytest
from support import adapters, servers

from loraplane.errors import LoraplaneError
from loraplane.worker import cache as c
from loraplane.worker import settings as worker_settings
from loraplane.worker import sources as s
from loraplane.worker.inference import peft as a
from loraplane.worker.prefetch import Prefetcher
from loraplane.worker.sources import gcs as g

gcs = servers.gcs


def _settings(endpoint: str, credentials: str = "anonymous", timeout_s: float = 5) -> s.SourceSettings:
    return s.SourceSettings(
        options={"gs": g.GcsSettings(endpoint=endpoint, credentials=credentials)}, timeout_s=timeout_s
    )


@pytest.fixture
def uploaded(tmp_path: Path, gcs: Any) -> tuple[str, Path, s.SourceSettings]:
    d = adapters.write_adapter(tmp_path / "a")
    bucket = gcs.bucket()
    gcs.put_dir(bucket, "team-a/sql", d)
    gcs.client.bucket(bucket).blob("team-a/sql/README.md").upload_from_string(b"not fetched")
    return f"gs://{bucket}/team-a/sql", d, _settings(gcs.endpoint_url)


def test_resolve_pins_generations_and_md5(uploaded: tuple[str, Path, s.SourceSettings], gcs: Any) -> None:
    uri, d, settings = uploaded
    r = s.resolve(uri + "/", None, settings)
    assert r.kind == "gs" and r.uri == uri
    weights = r.file("adapter_model.safetensors")
    data = (d / "adapter_model.safetensors").read_bytes()
    assert weights.size == len(data) and weights.etag == hashlib.md5(data).hexdigest()
    assert weights.version and weights.version.isdigit()
    assert [f.name for f in r.files] == list(a.ADAPTER_FILES)
    assert s.resolve(uri, None, settings) == r  # stable
    bucket = uri[5:].split("/")[0]
    gcs.client.bucket(bucket).blob("team-a/sql/adapter_model.safetensors").upload_from_string(data + b"\0")
    assert s.resolve(uri, None, settings).resolved_revision != r.resolved_revision


def test_prefetch_from_gcs(tmp_path: Path, uploaded: tuple[str, Path, s.SourceSettings]) -> None:
    uri, d, settings = uploaded
    r = s.resolve(uri, "2026-12-01", settings)
    assert r.requested_revision == "2026-12-01"
    entry = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings).prefetch(r)
    for name in a.ADAPTER_FILES:
        assert (entry.path / name).read_bytes() == (d / name).read_bytes()
    assert entry.sha256() == hashlib.sha256((d / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_missing_bucket_and_prefix(gcs: Any) -> None:
    settings = _settings(gcs.endpoint_url)
    with pytest.raises(s.SourceError) as e:
        s.resolve("gs://no-such-bucket-here/x", None, settings)
    assert e.value.reason == s.SOURCE_NOT_FOUND and not e.value.retry
    bucket = gcs.bucket()
    with pytest.raises(s.SourceError) as e:
        s.resolve(f"gs://{bucket}/nothing", None, settings)
    assert e.value.reason == s.SOURCE_NOT_FOUND and "no adapter files" in e.value.message


def test_pickle_only_prefix_is_refused(gcs: Any) -> None:
    bucket = gcs.bucket()
    gcs.client.bucket(bucket).blob("a/adapter_config.json").upload_from_string(b"{}")
    gcs.client.bucket(bucket).blob("a/adapter_model.bin").upload_from_string(b"\x80\x04K\x01.")
    with pytest.raises(s.SourceError) as e:
        s.resolve(f"gs://{bucket}/a", None, _settings(gcs.endpoint_url))
    assert e.value.reason == s.PICKLE_REFUSED and "adapter_model.bin" in e.value.message


def test_unreachable_endpoint_is_retryable() -> None:
    with pytest.raises(s.SourceError) as e:
        s.resolve("gs://bucket/a", None, _settings(servers.closed_url(), timeout_s=2))
    assert e.value.reason == s.SOURCE_UNREACHABLE and e.value.retry and "127.0.0.1" in e.value.message


def test_object_deleted_after_resolving(
    tmp_path: Path, uploaded: tuple[str, Path, s.SourceSettings], gcs: Any
) -> None:
    uri, _, settings = uploaded
    r = s.resolve(uri, None, settings)
    gcs.client.bucket(uri[5:].split("/")[0]).blob("team-a/sql/adapter_model.safetensors").delete()
    cache = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings, retries=0)
    with pytest.raises(LoraplaneError) as e:
        cache.prefetch(r)
    assert e.value.reason == s.FILE_MISSING and "disappeared" in e.value.message
    assert cache.index.entries() == []


def test_object_replaced_after_resolving(uploaded: tuple[str, Path, s.SourceSettings], gcs: Any) -> None:
    """The download asks for the resolved generation and checks the listed MD5: a replaced object is
    never mixed into the old version (the emulator ignores generations; the MD5 still catches it)."""
    uri, d, settings = uploaded
    r = s.resolve(uri, None, settings)
    data = (d / "adapter_model.safetensors").read_bytes()
    gcs.client.bucket(uri[5:].split("/")[0]).blob("team-a/sql/adapter_model.safetensors").upload_from_string(
        data[::-1]
    )
    with pytest.raises(s.SourceError) as e:
        s.fetch_file(r, "adapter_model.safetensors", io.BytesIO(), settings)
    assert e.value.reason in (s.SOURCE_CHANGED, s.CHECKSUM_MISMATCH) and e.value.retry


@pytest.mark.parametrize(
    ("content", "why"),
    [(None, "No such file"), ("not json", "not a readable service-account key file"), ("{}", "")],
)
def test_a_bad_key_file_is_refused_by_name(tmp_path: Path, content: str | None, why: str) -> None:
    key = tmp_path / "key.json"
    if content is not None:
        key.write_text(content)
    with pytest.raises(s.SourceError) as e:
        s.resolve("gs://bucket/a", None, _settings("http://127.0.0.1:9", credentials=str(key)))
    assert e.value.reason == s.SOURCE_FORBIDDEN and not e.value.retry
    assert f"--gs-credentials {key}" in e.value.message and why in e.value.message


def test_a_key_file_from_a_secret_authenticates(tmp_path: Path, uploaded: tuple[str, Path, s.SourceSettings]):
    """--gs-credentials=/path/key.json: the client signs a JWT with the key, trades it at the key's
    token_uri (here a local token endpoint) and sends the token; the token never reaches the logs."""
    import http.server
    import logging
    import threading

    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    seen: list[str] = []

    class Token(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            seen.append(self.rfile.read(int(self.headers["Content-Length"])).decode())
            body = json.dumps({"access_token": "ya29.secret-token-xyz", "expires_in": 3600}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Token)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    pem = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key = tmp_path / "key.json"
    key.write_text(
        json.dumps({
            "type": "service_account", "project_id": "p", "private_key_id": "k1", "private_key": pem.decode(),
            "client_email": "loraplane@p.iam.gserviceaccount.com", "client_id": "1",
            "token_uri": f"http://127.0.0.1:{server.server_address[1]}/token",
        })
    )  # fmt: skip
    uri, _, anonymous = uploaded
    endpoint = anonymous.options["gs"].endpoint
    records = io.StringIO()
    handler = logging.StreamHandler(records)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        r = s.resolve(uri, None, _settings(endpoint, credentials=str(key)))
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
        server.shutdown()
        server.server_close()
    assert r.kind == "gs" and len(r.files) == 2
    assert seen and "grant_type=urn" in seen[0] and "assertion=" in seen[0]  # a signed JWT was traded
    assert "ya29.secret-token-xyz" not in records.getvalue()


def test_the_kinds_settings_are_worker_flags(tmp_path: Path) -> None:
    """settings.py knows no kind by name: --gs-* come from the registry, with the env and config forms."""
    base = adapters.write_base_config(tmp_path / "base")
    help_text = worker_settings.build_parser().format_help()
    assert (
        "--gs-endpoint" in help_text
        and "--gs-credentials" in help_text
        and "LORAPLANE_GS_PROJECT" in help_text
    )
    got = worker_settings.load(
        ["--base-model", str(base), "--gs-endpoint", "http://127.0.0.1:1"],
        {"LORAPLANE_GS_CREDENTIALS": "anonymous"},
    )
    assert got.sources.source_options["gs"] == g.GcsSettings(
        endpoint="http://127.0.0.1:1", credentials="anonymous"
    )
    config = tmp_path / "worker.yaml"
    config.write_text("gs-project: billing-project\n")
    got = worker_settings.load(["--base-model", str(base), "--config", str(config)], {})
    assert got.sources.source_options["gs"].project == "billing-project"
    assert got.sources.source_options["gs"].credentials == "default"
    with pytest.raises(worker_settings.ConfigError, match="--gs-endpoint must be an http:// or https:// URL"):
        worker_settings.load(["--base-model", str(base), "--gs-endpoint", "localhost:4443"], {})
    with pytest.raises(worker_settings.ConfigError, match="--gs-credentials must be default, anonymous or"):
        worker_settings.load(["--base-model", str(base), "--gs-credentials", "key.json"], {})
