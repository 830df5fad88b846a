"""S3 sources (AWS or any S3-compatible store): a prefix resolved to its objects' ETags, objects streamed.

boto3 with ``SourceSettings.s3_endpoint_url`` and credentials from the standard chain (env,
profile, IRSA, instance role). A download asks for the exact ETag it resolved (If-Match), so an
object replaced in between is noticed, never mixed with the old version.
"""

from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Iterator
from typing import Any

from loraplane.worker.sources.refs import (
    CHUNK,
    FILE_MISSING,
    LISTED_FILES,
    OPTIONAL_FILES,
    SOURCE_CHANGED,
    SOURCE_FORBIDDEN,
    SOURCE_NOT_FOUND,
    SOURCE_UNREACHABLE,
    ClientErrors,
    Hasher,
    RemoteFile,
    ResolvedSource,
    Source,
    SourceSettings,
    check_listing,
    make_resolved,
    permanent,
    short,
    temporary,
)

_S3_LOCK = threading.Lock()
_S3_CLIENTS: dict[tuple[str | None, str | None, float], Any] = {}


def _s3_client(settings: SourceSettings) -> Any:
    """One client per endpoint: boto3 clients are thread-safe, sessions are not, so build under a lock."""
    key = (settings.s3_endpoint_url, settings.s3_region, settings.timeout_s)
    with _S3_LOCK:
        client = _S3_CLIENTS.get(key)
        if client is None:
            import boto3
            from botocore.config import Config

            cfg = Config(
                connect_timeout=settings.timeout_s,
                read_timeout=settings.timeout_s,
                retries={"max_attempts": 2, "mode": "standard"},  # the cache retries with its own backoff
            )
            client = boto3.session.Session().client(
                "s3", endpoint_url=settings.s3_endpoint_url, region_name=settings.s3_region, config=cfg
            )
            _S3_CLIENTS[key] = client
        return client


class _s3_errors(ClientErrors):
    """Map botocore failures to named source errors."""

    def __init__(self, where: str, endpoint: str | None) -> None:
        super().__init__(where, endpoint or "AWS S3")

    def translate(self, e: BaseException) -> None:
        from botocore import exceptions as bce

        w = self.where
        if isinstance(e, bce.NoCredentialsError):
            raise permanent(
                SOURCE_FORBIDDEN, f"{w}: no S3 credentials found; mount them as AWS_* env or a profile"
            ) from e
        if isinstance(e, bce.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket", "NoSuchKey", "404", "NotFound"):
                raise permanent(SOURCE_NOT_FOUND, f"{w}: not found ({code})") from e
            if code in ("PreconditionFailed", "412"):
                raise temporary(SOURCE_CHANGED, f"{w} changed since it was resolved; resolving again") from e
            if (
                code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")
                or status == 403
            ):
                raise permanent(
                    SOURCE_FORBIDDEN, f"{w}: S3 refused access ({code}); check the credentials"
                ) from e
            raise temporary(SOURCE_UNREACHABLE, f"{w}: S3 answered {code or status}") from e
        if isinstance(e, (bce.EndpointConnectionError, bce.ConnectionError, bce.HTTPClientError, OSError)):
            raise temporary(SOURCE_UNREACHABLE, f"{w}: cannot reach {self.endpoint}: {short(e)}") from e
        return None


def resolve(location: str, revision: str | None, settings: SourceSettings) -> ResolvedSource:
    """``revision`` is an opaque label (the CRD's): recorded, never needed to find the objects."""
    bucket, _, prefix = location.partition("/")
    uri = f"s3://{location}"
    client = _s3_client(settings)
    listing_prefix = f"{prefix}/" if prefix else ""
    present: dict[str, RemoteFile] = {}
    names: set[str] = set()
    with _s3_errors(uri, settings.s3_endpoint_url):
        # Only the adapter_* names: a prefix with thousands of checkpoints beside the adapter needs one page.
        resp = client.list_objects_v2(
            Bucket=bucket, Prefix=f"{listing_prefix}adapter_", Delimiter="/", MaxKeys=1000
        )
    for obj in resp.get("Contents", []):
        name = obj["Key"][len(listing_prefix) :]
        names.add(name)
        if name in LISTED_FILES:
            present[name] = RemoteFile(name, int(obj["Size"]), str(obj["ETag"]).strip('"'))
    if not names:
        raise permanent(
            SOURCE_NOT_FOUND,
            f"{uri}: no adapter files (adapter_config.json, adapter_model.safetensors) under this prefix",
        )
    for name in OPTIONAL_FILES:  # a chat template, model.sig: one request each, for exactly that key
        with _s3_errors(uri, settings.s3_endpoint_url):
            extra = client.list_objects_v2(Bucket=bucket, Prefix=f"{listing_prefix}{name}", MaxKeys=1)
        for obj in extra.get("Contents", []):
            if obj["Key"] == f"{listing_prefix}{name}":
                present[name] = RemoteFile(name, int(obj["Size"]), str(obj["ETag"]).strip('"'))
    files = check_listing(uri, present, names, settings)
    digest = hashlib.sha256("".join(f"{f.name}\0{f.size}\0{f.etag}\n" for f in files).encode()).hexdigest()[
        :40
    ]
    return make_resolved("s3", uri, digest, files, revision)


def chunks(resolved: ResolvedSource, rf: RemoteFile, settings: SourceSettings) -> Iterator[bytes]:
    location = resolved.uri[5:]
    bucket, _, prefix = location.partition("/")
    key = f"{prefix}/{rf.name}" if prefix else rf.name
    where = f"{resolved.uri}/{rf.name}"
    client = _s3_client(settings)
    kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key}
    if rf.etag:
        kwargs["IfMatch"] = f'"{rf.etag}"'
    with _s3_errors(where, settings.s3_endpoint_url):
        try:
            body = client.get_object(**kwargs)["Body"]
        except Exception as e:
            code = getattr(e, "response", {}).get("Error", {}).get("Code") if hasattr(e, "response") else None
            if code in ("NoSuchKey", "NoSuchBucket"):
                raise permanent(FILE_MISSING, f"{where} disappeared after it was resolved ({code})") from e
            raise
        try:
            yield from body.iter_chunks(CHUNK)
        finally:
            body.close()


def etag_hasher(rf: RemoteFile) -> Hasher | None:
    """The MD5 of the bytes, unless the object was a multipart upload (an ETag "...-N")."""
    if rf.etag is not None and re.fullmatch(r"[0-9a-f]{32}", rf.etag):
        return hashlib.md5(usedforsecurity=False), "MD5"
    return None


SOURCE = Source("s3", resolve, chunks, etag_hasher=etag_hasher)
