"""Google Cloud Storage sources: ``gs://bucket/prefix`` resolved to its objects' generations, objects streamed.

The official client (google-cloud-storage). Credentials (``--gs-credentials``): ``default`` is
Application Default Credentials (workload identity on GKE, GOOGLE_APPLICATION_CREDENTIALS, the
metadata server), a path is a service-account key file mounted from a Secret, ``anonymous`` reads
public buckets and emulators. ``--gs-endpoint`` (or STORAGE_EMULATOR_HOST) points the client at an
emulator or a private endpoint. A download asks for the exact generation it resolved, so an object
replaced in between is noticed, never mixed with the old version, and its bytes are checked against
the MD5 the listing gave.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from loraplane.worker.sources.refs import (
    ADAPTER_FILES,
    CHUNK,
    FILE_MISSING,
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


@dataclass(frozen=True)
class GcsSettings:
    """How the worker reaches Google Cloud Storage (flags --gs-<field>)."""

    endpoint: str = ""
    """Storage API endpoint URL (an emulator, a private endpoint). Empty: Google's, or STORAGE_EMULATOR_HOST."""
    credentials: str = "default"
    """default (Application Default Credentials: workload identity, GOOGLE_APPLICATION_CREDENTIALS),
    anonymous (public buckets, emulators), or the absolute path of a service-account key file (a Secret)."""
    project: str = ""
    """Project the client bills requests to (requester-pays buckets). Empty: none needed to read."""

    def __post_init__(self) -> None:
        if self.endpoint and not re.match(r"^https?://", self.endpoint):
            raise ValueError(f"--gs-endpoint must be an http:// or https:// URL, got {self.endpoint!r}")
        if self.credentials not in ("default", "anonymous") and not os.path.isabs(self.credentials):
            raise ValueError(
                f"--gs-credentials must be default, anonymous or the absolute path of a key file, "
                f"got {self.credentials!r}"
            )


_LOCAL = threading.local()  # one client per thread and settings: the client's HTTP session is not shared


def _client(settings: SourceSettings) -> Any:
    gs = settings.options_for("gs", GcsSettings)
    clients: dict[GcsSettings, Any] = _LOCAL.__dict__.setdefault("clients", {})
    client = clients.get(gs)
    if client is None:
        from google.cloud import storage

        options = {"api_endpoint": gs.endpoint} if gs.endpoint else None
        project = gs.project or None  # None: the client looks for no project (reads need none)
        if gs.credentials == "anonymous":
            from google.auth.credentials import AnonymousCredentials

            client = storage.Client(
                project=project, credentials=AnonymousCredentials(), client_options=options
            )
        elif gs.credentials == "default":
            client = storage.Client(project=project, client_options=options)
        else:
            try:
                client = storage.Client.from_service_account_json(
                    gs.credentials, project=project, client_options=options
                )
            except (OSError, ValueError) as e:  # missing, unreadable, not a service-account key
                raise permanent(
                    SOURCE_FORBIDDEN,
                    f"--gs-credentials {gs.credentials}: not a readable service-account key file "
                    f"({short(e)}); mount the key's Secret there",
                ) from e
        clients[gs] = client
    return client


class _gcs_errors(ClientErrors):
    """Map google-cloud-storage, google-auth and transport failures to named source errors."""

    def translate(self, e: BaseException) -> None:
        from google.api_core import exceptions as gexc
        from google.auth import exceptions as auth_exc

        w = self.where
        if isinstance(e, auth_exc.DefaultCredentialsError):
            raise permanent(
                SOURCE_FORBIDDEN,
                f"{w}: no Google Cloud credentials found; use workload identity, mount a key file and "
                "set --gs-credentials to its path, or --gs-credentials=anonymous for a public bucket",
            ) from e
        if isinstance(e, (auth_exc.RefreshError, gexc.Unauthorized, gexc.Forbidden)):
            raise permanent(
                SOURCE_FORBIDDEN,
                f"{w}: Google Cloud Storage refused access; check --gs-credentials: {short(e)}",
            ) from e
        if isinstance(e, gexc.NotFound):
            raise permanent(SOURCE_NOT_FOUND, f"{w}: not found ({short(e)})") from e
        if isinstance(e, gexc.PreconditionFailed):
            raise temporary(SOURCE_CHANGED, f"{w} changed since it was resolved; resolving again") from e
        if isinstance(e, gexc.GoogleAPICallError):
            raise temporary(SOURCE_UNREACHABLE, f"{w}: Google Cloud Storage answered {short(e)}") from e
        if isinstance(e, (OSError, auth_exc.TransportError, _transport_errors())):
            raise temporary(SOURCE_UNREACHABLE, f"{w}: cannot reach {self.endpoint}: {short(e)}") from e
        return None


def _transport_errors() -> type[BaseException]:
    import requests

    return requests.exceptions.RequestException


def _endpoint(settings: SourceSettings) -> str:
    gs = settings.options_for("gs", GcsSettings)
    return gs.endpoint or os.environ.get("STORAGE_EMULATOR_HOST") or "Google Cloud Storage"


def _md5_hex(md5_b64: str | None) -> str | None:
    """The listing's base64 MD5 as hex (composite objects have none)."""
    try:
        return base64.b64decode(md5_b64 or "", validate=True).hex() or None
    except (binascii.Error, ValueError):
        return None


def resolve(location: str, revision: str | None, settings: SourceSettings) -> ResolvedSource:
    """``revision`` is an opaque label (the CRD's): recorded, never needed to find the objects."""
    bucket, _, prefix = location.partition("/")
    uri = f"gs://{location}"
    listing_prefix = f"{prefix}/" if prefix else ""
    present: dict[str, RemoteFile] = {}
    names: set[str] = set()
    with _gcs_errors(uri, _endpoint(settings)):
        # Only the adapter_* names: a prefix with thousands of checkpoints beside the adapter needs one page.
        blobs = list(
            _client(settings).list_blobs(
                bucket,
                prefix=f"{listing_prefix}adapter_",
                delimiter="/",
                max_results=1000,
                timeout=settings.timeout_s,
                retry=None,  # the cache retries with its own backoff
            )
        )
    for blob in blobs:
        name = blob.name[len(listing_prefix) :]
        names.add(name)
        if name in ADAPTER_FILES:
            present[name] = RemoteFile(
                name, int(blob.size), _md5_hex(blob.md5_hash), version=str(blob.generation)
            )
    if not names:
        raise permanent(
            SOURCE_NOT_FOUND,
            f"{uri}: no adapter files (adapter_config.json, adapter_model.safetensors) under this prefix",
        )
    for name in OPTIONAL_FILES:  # a chat template, model.sig: one request each, for exactly that object
        with _gcs_errors(uri, _endpoint(settings)):
            blob = (
                _client(settings)
                .bucket(bucket)
                .get_blob(f"{listing_prefix}{name}", timeout=settings.timeout_s, retry=None)
            )
        if blob is not None:
            present[name] = RemoteFile(
                name, int(blob.size), _md5_hex(blob.md5_hash), version=str(blob.generation)
            )
    files = check_listing(uri, present, names, settings)
    pinned = "".join(f"{f.name}\0{f.size}\0{f.version}\0{f.etag}\n" for f in files)
    return make_resolved("gs", uri, hashlib.sha256(pinned.encode()).hexdigest()[:40], files, revision)


def chunks(resolved: ResolvedSource, rf: RemoteFile, settings: SourceSettings) -> Iterator[bytes]:
    bucket_name, _, prefix = resolved.uri[5:].partition("/")
    key = f"{prefix}/{rf.name}" if prefix else rf.name
    where = f"{resolved.uri}/{rf.name}"
    with _gcs_errors(where, _endpoint(settings)):
        bucket = _client(settings).bucket(bucket_name)
        blob = bucket.blob(key, generation=int(rf.version) if rf.version else None)
        try:
            # raw_download: the stored bytes (no gzip transcoding), which the listing's MD5 and size describe.
            reader = blob.open(
                "rb", chunk_size=CHUNK, raw_download=True, timeout=settings.timeout_s, retry=None
            )
        except Exception as e:
            _gone(e, bucket, key, where)
            raise
        with reader:
            while True:
                try:
                    data = reader.read(CHUNK)
                except Exception as e:
                    _gone(e, bucket, key, where)
                    raise
                if not data:
                    return
                yield data


def _gone(e: Exception, bucket: Any, key: str, where: str) -> None:
    """A 404 on the pinned generation: the object was deleted (FileMissing) or replaced (resolve again)."""
    from google.api_core import exceptions as gexc

    if not isinstance(e, gexc.NotFound):
        return
    if bucket.get_blob(key, retry=None) is None:
        raise permanent(FILE_MISSING, f"{where} disappeared after it was resolved") from e
    raise temporary(SOURCE_CHANGED, f"{where} was replaced since it was resolved; resolving again") from e


def etag_hasher(rf: RemoteFile) -> Hasher | None:
    """The MD5 of the bytes (objects uploaded whole have one; composite objects only a CRC32C)."""
    if rf.etag is not None and re.fullmatch(r"[0-9a-f]{32}", rf.etag):
        return hashlib.md5(usedforsecurity=False), "MD5"
    return None


SOURCE = Source("gs", resolve, chunks, options=GcsSettings, etag_hasher=etag_hasher)
