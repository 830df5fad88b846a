"""S3 sources with the real boto3 client against moto's standalone server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pytest
from support import adapters, servers

from loraplane.errors import LoraplaneError
from loraplane.worker import cache as c
from loraplane.worker import sources as s
from loraplane.worker.inference import peft as a
from loraplane.worker.prefetch import Prefetcher

moto_s3 = servers.moto_s3


@pytest.fixture
def uploaded(tmp_path: Path, moto_s3: Any) -> tuple[str, Path, s.SourceSettings]:
    d = adapters.write_adapter(tmp_path / "a")
    bucket = moto_s3.bucket()
    moto_s3.put_dir(bucket, "team-a/sql", d)
    moto_s3.client.put_object(Bucket=bucket, Key="team-a/sql/README.md", Body=b"not fetched")
    return f"s3://{bucket}/team-a/sql", d, s.SourceSettings(s3_endpoint_url=moto_s3.endpoint_url, timeout_s=5)


def test_resolve_pins_the_etags(uploaded: tuple[str, Path, s.SourceSettings], moto_s3: Any) -> None:
    uri, d, settings = uploaded
    r = s.resolve(uri + "/", None, settings)
    assert r.kind == "s3" and r.uri == uri
    weights = r.file("adapter_model.safetensors")
    data = (d / "adapter_model.safetensors").read_bytes()
    assert weights.size == len(data) and weights.etag == hashlib.md5(data).hexdigest()
    assert [f.name for f in r.files] == list(a.ADAPTER_FILES)
    assert s.resolve(uri, None, settings) == r  # stable
    bucket = uri[5:].split("/")[0]
    moto_s3.client.put_object(Bucket=bucket, Key="team-a/sql/adapter_model.safetensors", Body=data + b"\0")
    assert s.resolve(uri, None, settings).resolved_revision != r.resolved_revision


def test_the_s3_example_with_its_revision_label_resolves(tmp_path: Path, moto_s3: Any) -> None:
    """examples/s3-adapter.yaml sets spec.revision on an s3:// path, the CRD calls it an opaque version
    label and admission accepts it; the worker refused it ("S3 paths have no revisions"). Now it is
    recorded, and a rewrite in place under a new label is a new version (the bytes decide)."""
    import yaml

    spec = yaml.safe_load((Path(__file__).parents[2] / "examples" / "s3-adapter.yaml").read_text())["spec"]
    bucket, _, prefix = spec["path"][5:].partition("/")
    moto_s3.client.create_bucket(Bucket=bucket)
    d = adapters.write_adapter(tmp_path / "a")
    moto_s3.put_dir(bucket, prefix, d)
    settings = s.SourceSettings(s3_endpoint_url=moto_s3.endpoint_url, timeout_s=5)
    first = s.resolve(spec["path"], spec["revision"], settings)
    assert first.requested_revision == spec["revision"] == "2026-11-01"
    moto_s3.put_dir(bucket, prefix, adapters.write_adapter(tmp_path / "b", seed=9))
    second = s.resolve(spec["path"], "2026-11-02", settings)
    assert second.resolved_revision != first.resolved_revision and second.cache_key != first.cache_key


def test_prefetch_from_s3(tmp_path: Path, uploaded: tuple[str, Path, s.SourceSettings]) -> None:
    uri, d, settings = uploaded
    r = s.resolve(uri, None, settings)
    entry = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings).prefetch(r)
    for name in a.ADAPTER_FILES:
        assert (entry.path / name).read_bytes() == (d / name).read_bytes()
    assert entry.sha256() == hashlib.sha256((d / "adapter_model.safetensors").read_bytes()).hexdigest()
    assert sorted(p.name for p in entry.path.iterdir()) == sorted([*a.ADAPTER_FILES, c.MANIFEST])


def test_missing_bucket_and_prefix(moto_s3: Any) -> None:
    settings = s.SourceSettings(s3_endpoint_url=moto_s3.endpoint_url, timeout_s=5)
    with pytest.raises(s.SourceError) as e:
        s.resolve("s3://no-such-bucket-here/x", None, settings)
    assert e.value.reason == s.SOURCE_NOT_FOUND and "NoSuchBucket" in e.value.message
    bucket = moto_s3.bucket()
    with pytest.raises(s.SourceError) as e:
        s.resolve(f"s3://{bucket}/nothing", None, settings)
    assert e.value.reason == s.SOURCE_NOT_FOUND and "no adapter files" in e.value.message


def test_pickle_only_prefix_is_refused(tmp_path: Path, moto_s3: Any) -> None:
    bucket = moto_s3.bucket()
    moto_s3.client.put_object(Bucket=bucket, Key="a/adapter_config.json", Body=b"{}")
    moto_s3.client.put_object(Bucket=bucket, Key="a/adapter_model.bin", Body=b"\x80\x04K\x01.")
    settings = s.SourceSettings(s3_endpoint_url=moto_s3.endpoint_url, timeout_s=5)
    with pytest.raises(s.SourceError) as e:
        s.resolve(f"s3://{bucket}/a", None, settings)
    assert e.value.reason == s.PICKLE_REFUSED and "adapter_model.bin" in e.value.message


def test_unreachable_endpoint_is_retryable() -> None:
    settings = s.SourceSettings(s3_endpoint_url=servers.closed_url(), timeout_s=2)
    with pytest.raises(s.SourceError) as e:
        s.resolve("s3://bucket/a", None, settings)
    assert e.value.reason == s.SOURCE_UNREACHABLE and e.value.retry and "127.0.0.1" in e.value.message


def test_object_deleted_after_resolving(
    tmp_path: Path, uploaded: tuple[str, Path, s.SourceSettings], moto_s3: Any
) -> None:
    uri, _, settings = uploaded
    r = s.resolve(uri, None, settings)
    bucket = uri[5:].split("/")[0]
    moto_s3.client.delete_object(Bucket=bucket, Key="team-a/sql/adapter_model.safetensors")
    cache = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings, retries=0)
    with pytest.raises(LoraplaneError) as e:
        cache.prefetch(r)
    assert e.value.reason == s.FILE_MISSING and "disappeared" in e.value.message
    assert cache.index.entries() == []


def test_object_replaced_after_resolving(
    tmp_path: Path, uploaded: tuple[str, Path, s.SourceSettings], moto_s3: Any
) -> None:
    """The download asks for the resolved ETag: a replaced object is never mixed into the old version."""
    uri, d, settings = uploaded
    r = s.resolve(uri, None, settings)
    bucket = uri[5:].split("/")[0]
    data = (d / "adapter_model.safetensors").read_bytes()
    moto_s3.client.put_object(Bucket=bucket, Key="team-a/sql/adapter_model.safetensors", Body=data[::-1])
    with pytest.raises(s.SourceError) as e:
        s.fetch_file(r, "adapter_model.safetensors", io.BytesIO(), settings)
    assert e.value.reason in (s.SOURCE_CHANGED, s.CHECKSUM_MISMATCH) and e.value.retry


def test_validate_cli_fetches_an_s3_adapter(
    tmp_path: Path, uploaded: tuple[str, Path, s.SourceSettings], capsys
) -> None:
    from loraplane.worker import validate

    uri, _, settings = uploaded
    base = adapters.write_base_config(tmp_path / "base")
    argv = [uri, "--base-model", str(base), "--s3-endpoint-url", str(settings.s3_endpoint_url)]
    assert validate.main(argv) == 0
    out = capsys.readouterr().out
    assert f"fetched {uri}" in out and "OK: rank 8" in out
    assert validate.main([*argv, "--max-lora-rank", "4"]) == 1


def test_no_credential_reaches_the_logs_at_debug(
    tmp_path: Path, moto_s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11: at DEBUG, botocore logged the signed Authorization header (the access key id 4 times).
    Every logger at DEBUG, a resolve and a prefetch against moto's server: neither the key id nor the
    secret appears anywhere in what was logged, while the signed requests themselves were logged."""
    import io
    import logging

    key_id, secret = "AKIALORAPLANE0TEST01", "loraplane/Secret+Key0123456789abcdefghij"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    d = adapters.write_adapter(tmp_path / "a")
    bucket = moto_s3.bucket()
    moto_s3.put_dir(bucket, "x", d)
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        # a timeout of its own: a fresh boto3 client, which reads the credentials above
        settings = s.SourceSettings(s3_endpoint_url=moto_s3.endpoint_url, timeout_s=7.25)
        cache = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings)
        cache.prefetch(s.resolve(f"s3://{bucket}/x", "v1", settings))
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
    logged = out.getvalue()
    assert "botocore" in logged and "Authorization" in logged  # the signed requests were logged at DEBUG
    assert key_id not in logged and secret not in logged
    assert "Credential=***" in logged or "Authorization': b'***" in logged or "Authorization': '***" in logged


@pytest.mark.parametrize(
    "line",
    [
        "headers: {'Authorization': b'AWS4-HMAC-SHA256 Credential=AKIAZZZZZZZZZZZZZZZZ/20261201/us-east-1/s3'}",
        "GET https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIAZZZZZZZZZZZZZZZZ%2F2026&X-Amz-Signature=abcdef0123",
        "{'X-Amz-Security-Token': 'FwoGZXIvYXdzEJr-session-token'}",
        "Authorization: Bearer hf_abcdefghijklmnopqrstuvwxyz012345",
    ],
)
def test_credential_shapes_are_masked_even_when_not_in_the_environment(line: str) -> None:
    from loraplane.worker import redaction

    clean = redaction.redact(line)
    for secret in ("AKIAZZZZZZZZZZZZZZZZ", "abcdef0123", "FwoGZXIvYXdzEJr-session-token", "hf_abcdefghij"):
        assert secret not in clean, clean
    assert redaction.MASK in clean


def test_the_adapters_chat_template_is_fetched_from_s3(tmp_path: Path, moto_s3: Any) -> None:
    d = adapters.write_adapter(tmp_path / "a")
    (d / "chat_template.jinja").write_text("{{ messages }}")
    bucket = moto_s3.bucket()
    moto_s3.put_dir(bucket, "team-a/chat", d)
    settings = s.SourceSettings(s3_endpoint_url=moto_s3.endpoint_url, timeout_s=5)
    r = s.resolve(f"s3://{bucket}/team-a/chat", None, settings)
    assert [f.name for f in r.files] == [*a.ADAPTER_FILES, "chat_template.jinja"]
    entry = Prefetcher(c.CacheIndex(tmp_path / "cache", 1 << 30), sources_settings=settings).prefetch(r)
    assert (entry.path / "chat_template.jinja").read_text() == "{{ messages }}"
