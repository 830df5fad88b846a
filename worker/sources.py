"""Where adapter weights come from: an adapter's ``spec.path`` resolved to an immutable reference.

``resolve`` turns a path (Hugging Face repo, local directory, S3 prefix) and an optional revision
into a frozen ``ResolvedSource``: the commit sha / ETag digest / file-stat digest that pins the exact
bytes, the adapter files with their sizes and checksums, and a ``cache_key`` derived from all that.
``fetch_file`` streams one of those files into an open file, bounding its size and verifying the
checksum the source gave. The cache (cache.py) owns atomicity, budgets and retries; this module
only knows how to talk to each kind of source and how to name each failure.

Only ``adapter_config.json`` and ``adapter_model.safetensors`` are ever fetched; a source that only
offers ``adapter_model.bin`` (a pickle) is refused with ``PickleRefused``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from loraplane.crds.errors import LoraplaneError

log = logging.getLogger(__name__)

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
ACCEPTED_FORMS = "a Hugging Face repo id (org/name or hf://org/name), an absolute path or file:///dir, or s3://bucket/prefix"
_CHUNK = 4 << 20

# --- reasons -------------------------------------------------------------------------------------
INVALID_PATH = "InvalidPath"
PATH_NOT_ALLOWED = "PathNotAllowed"
SYMLINK_ESCAPE = "SymlinkEscape"
SOURCE_NOT_FOUND = "SourceNotFound"
REVISION_NOT_FOUND = "RevisionNotFound"
SOURCE_FORBIDDEN = "SourceForbidden"
SOURCE_UNREACHABLE = "SourceUnreachable"
SOURCE_CHANGED = "SourceChanged"
FILE_MISSING = "FileMissing"
PICKLE_REFUSED = "PickleRefused"
TOO_LARGE = "TooLarge"
CHECKSUM_MISMATCH = "ChecksumMismatch"
OFFLINE_NOT_CACHED = "OfflineNotCached"


class SourceError(LoraplaneError):
    """A source could not be resolved or read; ``reason`` says why and ``retry`` whether to try again."""


def _permanent(reason: str, message: str) -> SourceError:
    return SourceError(reason, message, retry=False)


def _temporary(reason: str, message: str) -> SourceError:
    return SourceError(reason, message, retry=True)


# --- settings and values -------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceSettings:
    """How the worker reaches adapter sources."""

    local_roots: tuple[Path, ...] = ()
    """Directories under which local adapter paths are allowed (after resolving symlinks). Empty: no local paths."""
    hf_endpoint: str | None = None
    """Hub URL (e.g. https://huggingface.co or a mirror). None: huggingface_hub's default, i.e. HF_ENDPOINT."""
    hf_token: str | None = None
    """Hub token. None: huggingface_hub reads HF_TOKEN from the environment. Never logged."""
    hf_offline: bool | None = None
    """Resolve Hub paths without network, from recorded resolutions or the Hub cache. None: HF_HUB_OFFLINE."""
    hf_cache_dir: Path | None = None
    """A huggingface_hub cache (HF_HUB_CACHE layout) to read in offline mode. None: the library default."""
    state_dir: Path | None = None
    """Where Hub resolutions (revision -> commit) are recorded, so offline mode can resolve them later."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint URL (MinIO, Ceph, moto). None: AWS S3. Credentials: boto3's standard chain."""
    s3_region: str | None = None
    """S3 region name. None: boto3's standard chain (AWS_REGION, config file)."""
    timeout_s: float = 30.0
    """Seconds to wait for a connection or a read before calling the source unreachable."""
    max_file_bytes: int = 8 << 30
    """Largest adapter weights file accepted, in bytes (8 GiB: far above any LoRA of a 70B model)."""
    max_config_bytes: int = 1 << 20
    """Largest adapter_config.json accepted, in bytes (1 MiB; real ones are about 1 KiB)."""

    def __repr__(self) -> str:  # the token must never reach a log line
        shown = {k: v for k, v in asdict(self).items() if k != "hf_token"}
        return f"SourceSettings({shown}, hf_token={'<set>' if self.hf_token else None})"


@dataclass(frozen=True)
class RemoteFile:
    """One adapter file at the source: its size and whatever checksum the source gives."""

    name: str
    size: int
    etag: str | None = None
    """S3 ETag or Hub blob id (the git object id for small files)."""
    sha256: str | None = None
    """Content sha256 when the source gives it (Hub LFS files)."""


@dataclass(frozen=True)
class ResolvedSource:
    """An immutable reference to one version of an adapter's files."""

    kind: str
    """"hf" | "local" | "s3"."""
    uri: str
    """Normalised source: hf://org/name, file:///abs/dir, s3://bucket/prefix."""
    resolved_revision: str
    """Hub commit sha; S3: digest of the objects' ETags; local: digest of (name, size, mtime_ns)."""
    files: tuple[RemoteFile, ...]
    cache_key: str
    """Safe as a directory name; derived from kind, uri and resolved_revision."""
    requested_revision: str | None = None
    local_dir: str | None = field(default=None, compare=False)
    """Where the files can be read directly (local sources, or a Hub snapshot in offline mode)."""

    def file(self, name: str) -> RemoteFile:
        for f in self.files:
            if f.name == name:
                return f
        raise _permanent(FILE_MISSING, f"{self.uri} has no {name}")

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


def cache_key_for(kind: str, uri: str, resolved_revision: str) -> str:
    """A directory name unique to (kind, uri, revision), readable enough to find by eye."""
    digest = hashlib.sha256(f"{kind}\0{uri}\0{resolved_revision}".encode()).hexdigest()[:24]
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", uri.split("://", 1)[-1]).strip("-.")[-48:].strip("-.")
    return f"{kind}-{tail}-{digest}" if tail else f"{kind}-{digest}"


def _make(
    kind: str, uri: str, rev: str, files: list[RemoteFile], requested: str | None, **kw: Any
) -> ResolvedSource:
    order = {n: i for i, n in enumerate(ADAPTER_FILES)}
    files.sort(key=lambda f: order.get(f.name, 99))
    return ResolvedSource(kind, uri, rev, tuple(files), cache_key_for(kind, uri, rev), requested, **kw)


def _check_listing(
    uri: str, present: dict[str, RemoteFile], names: set[str], settings: SourceSettings
) -> list[RemoteFile]:
    """The adapter files from a listing, or the named failure (pickle only, missing, too large)."""
    if WEIGHTS_FILE not in present:
        if PICKLE_FILE in names:
            raise _permanent(
                PICKLE_REFUSED,
                f"{uri} has {PICKLE_FILE} (pickled weights, never loaded) but no {WEIGHTS_FILE}; "
                "re-save the adapter with save_pretrained(safe_serialization=True)",
            )
        raise _permanent(
            FILE_MISSING, f"{uri} has no {WEIGHTS_FILE}; a PEFT LoRA adapter needs {ADAPTER_FILES}"
        )
    if CONFIG_FILE not in present:
        raise _permanent(
            FILE_MISSING, f"{uri} has no {CONFIG_FILE}; a PEFT LoRA adapter needs {ADAPTER_FILES}"
        )
    for f, limit in (
        (present[CONFIG_FILE], settings.max_config_bytes),
        (present[WEIGHTS_FILE], settings.max_file_bytes),
    ):
        if f.size > limit:
            raise _permanent(
                TOO_LARGE, f"{uri}: {f.name} is {f.size} bytes, above the limit of {limit} bytes"
            )
    return [present[n] for n in ADAPTER_FILES]


# --- path parsing --------------------------------------------------------------------------------
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def parse_path(path: str) -> tuple[str, str]:
    """(kind, location) for a spec.path: ("hf", "org/name"), ("local", "/abs"), ("s3", "bucket/prefix")."""
    if not isinstance(path, str) or not path or path != path.strip() or "\0" in path:
        raise _permanent(
            INVALID_PATH, f"path {path!r} is empty or has surrounding spaces; use {ACCEPTED_FORMS}"
        )
    if path.startswith("hf://"):
        kind, rest = "hf", path[5:].strip("/")
    elif path.startswith("s3://"):
        kind, rest = "s3", path[5:]
    elif path.startswith("file://"):
        kind, rest = "local", path[7:]
        if not rest.startswith("/"):
            raise _permanent(
                INVALID_PATH, f"{path!r}: file:// needs an absolute path (file:///dir); use {ACCEPTED_FORMS}"
            )
    elif path.startswith("/"):
        kind, rest = "local", path
    elif "://" in path:
        raise _permanent(INVALID_PATH, f"{path!r} has an unknown scheme; use {ACCEPTED_FORMS}")
    else:
        kind, rest = "hf", path
    if ".." in PurePosixPath(rest).parts or ".." in rest.split("/"):
        raise _permanent(PATH_NOT_ALLOWED, f"{path!r} contains '..'; name the adapter directory directly")
    if kind == "hf" and not _REPO_RE.match(rest):
        raise _permanent(
            INVALID_PATH, f"{path!r} is not a Hub repo id (org/name) nor another form; use {ACCEPTED_FORMS}"
        )
    if kind == "s3":
        bucket = rest.split("/", 1)[0]
        if not _BUCKET_RE.match(bucket):
            raise _permanent(
                INVALID_PATH, f"{path!r}: {bucket!r} is not a valid S3 bucket name; use s3://bucket/prefix"
            )
        rest = rest.rstrip("/")
    return kind, rest


def resolve(path: str, revision: str | None, settings: SourceSettings) -> ResolvedSource:
    """Resolve an adapter path (and revision) to an immutable reference. Blocking, thread-safe.

    Raises:
        SourceError: with reason InvalidPath, PathNotAllowed, SymlinkEscape, SourceNotFound,
            RevisionNotFound, SourceForbidden, SourceUnreachable (retry), FileMissing, PickleRefused,
            TooLarge, OfflineNotCached.
    """
    kind, location = parse_path(path)
    if kind == "local":
        if revision:
            raise _permanent(INVALID_PATH, f"{path}: a local path has no revisions; remove spec.revision")
        return _resolve_local(location, settings)
    if kind == "s3":
        if revision:
            raise _permanent(INVALID_PATH, f"{path}: S3 paths have no revisions; remove spec.revision")
        return _resolve_s3(location, settings)
    return _resolve_hf(location, revision, settings)


# --- local ---------------------------------------------------------------------------------------
def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _resolve_local(location: str, settings: SourceSettings) -> ResolvedSource:
    lexical = Path(os.path.normpath(location))
    uri = f"file://{lexical}"
    if not settings.local_roots:
        raise _permanent(
            PATH_NOT_ALLOWED, f"{uri}: this worker allows no local paths; configure a local root"
        )
    roots = [Path(os.path.normpath(r)) for r in settings.local_roots]
    lexical_root = next((r for r in roots if _under(lexical, r)), None)
    if lexical_root is None:
        shown = ", ".join(str(r) for r in roots)
        raise _permanent(
            PATH_NOT_ALLOWED, f"{uri} is outside the allowed local roots ({shown}); move it under one"
        )
    real_root = Path(os.path.realpath(lexical_root))
    real = Path(os.path.realpath(lexical))
    if not _under(real, real_root):
        raise _permanent(
            SYMLINK_ESCAPE, f"{uri} resolves through a symlink to {real}, outside the root {lexical_root}"
        )
    if not real.is_dir():
        raise _permanent(SOURCE_NOT_FOUND, f"{uri} is not a directory on this worker")
    present: dict[str, RemoteFile] = {}
    names: set[str] = set()
    stamp = hashlib.sha256()
    for name in (*ADAPTER_FILES, PICKLE_FILE):
        p = real / name
        if not os.path.lexists(p):
            continue
        names.add(name)
        target = Path(os.path.realpath(p))
        if not _under(target, real_root):
            raise _permanent(
                SYMLINK_ESCAPE, f"{uri}/{name} is a symlink to {target}, outside the root {lexical_root}"
            )
        try:
            st = target.stat()
        except OSError as e:
            raise _permanent(FILE_MISSING, f"{uri}/{name} cannot be read: {e.strerror}") from e
        if name in ADAPTER_FILES:
            present[name] = RemoteFile(name, st.st_size)
            stamp.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    files = _check_listing(uri, present, names, settings)
    return _make("local", uri, stamp.hexdigest()[:40], files, None, local_dir=str(real))


# --- Hugging Face Hub ----------------------------------------------------------------------------
def _hf_offline(settings: SourceSettings) -> bool:
    if settings.hf_offline is not None:
        return settings.hf_offline
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hf_endpoint(settings: SourceSettings) -> str:
    from huggingface_hub import constants

    return (settings.hf_endpoint or constants.ENDPOINT).rstrip("/")


def _record_path(settings: SourceSettings, uri: str, revision: str | None) -> Path | None:
    if settings.state_dir is None:
        return None
    key = hashlib.sha256(f"{uri}\0{revision or 'main'}".encode()).hexdigest()[:32]
    return Path(settings.state_dir) / "hf-refs" / f"{key}.json"


def _record(settings: SourceSettings, resolved: ResolvedSource) -> None:
    path = _record_path(settings, resolved.uri, resolved.requested_revision)
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        data = asdict(resolved)
        data.pop("local_dir", None)
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError as e:  # an unrecorded resolution only costs offline mode; never fail for it
        log.warning("could not record the resolution of %s: %s", resolved.uri, e)


def _recorded(settings: SourceSettings, uri: str, revision: str | None) -> ResolvedSource | None:
    path = _record_path(settings, uri, revision)
    if path is None or not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        files = tuple(RemoteFile(**f) for f in data.pop("files"))
        return ResolvedSource(files=files, **data)
    except (OSError, ValueError, TypeError):
        return None


def _resolve_hf(repo_id: str, revision: str | None, settings: SourceSettings) -> ResolvedSource:
    uri = f"hf://{repo_id}"
    if _hf_offline(settings):
        return _resolve_hf_offline(repo_id, uri, revision, settings)
    from huggingface_hub import HfApi

    api = HfApi(endpoint=_hf_endpoint(settings), token=settings.hf_token)
    where = f"{uri}@{revision or 'main'}"
    with _hf_errors(where):
        info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=settings.timeout_s)
    present: dict[str, RemoteFile] = {}
    names: set[str] = set()
    for s in info.siblings or []:
        names.add(s.rfilename)
        if s.rfilename in ADAPTER_FILES:
            lfs = s.lfs
            size = lfs.size if lfs is not None else s.size
            if size is None:
                raise _temporary(
                    SOURCE_UNREACHABLE, f"{where}: the Hub did not report the size of {s.rfilename}"
                )
            present[s.rfilename] = RemoteFile(s.rfilename, int(size), s.blob_id, lfs.sha256 if lfs else None)
    files = _check_listing(uri, present, names, settings)
    if not info.sha:
        raise _temporary(SOURCE_UNREACHABLE, f"{where}: the Hub did not report a commit sha")
    resolved = _make("hf", uri, info.sha, files, revision)
    _record(settings, resolved)
    return resolved


def _resolve_hf_offline(
    repo_id: str, uri: str, revision: str | None, settings: SourceSettings
) -> ResolvedSource:
    recorded = _recorded(settings, uri, revision)
    if recorded is not None:
        return recorded
    # A pre-seeded huggingface_hub cache (e.g. `hf download` into HF_HUB_CACHE) also serves.
    from huggingface_hub import try_to_load_from_cache

    found: dict[str, Path] = {}
    for name in (*ADAPTER_FILES, PICKLE_FILE):
        hit = try_to_load_from_cache(repo_id, name, cache_dir=settings.hf_cache_dir, revision=revision)
        if isinstance(hit, str):
            found[name] = Path(hit)
    if not found:
        raise _permanent(
            OFFLINE_NOT_CACHED,
            f"{uri}@{revision or 'main'} is not in the local caches and Hub offline mode is on; "
            "unset HF_HUB_OFFLINE or pre-seed the cache",
        )
    snapshot = next(iter(found.values())).parent
    present = {n: RemoteFile(n, p.stat().st_size) for n, p in found.items() if n in ADAPTER_FILES}
    files = _check_listing(uri, present, set(found), settings)
    return _make("hf", uri, snapshot.name, files, revision, local_dir=str(snapshot))


class _hf_errors:
    """Map huggingface_hub and HTTP-client failures to named source errors."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: object) -> bool:
        if e is None or isinstance(e, LoraplaneError):
            return False
        from huggingface_hub import errors as hfe

        w = self.where
        if isinstance(e, hfe.RevisionNotFoundError):
            raise _permanent(
                REVISION_NOT_FOUND, f"{w}: no such revision; give a branch, tag or commit that exists"
            ) from e
        if isinstance(e, hfe.GatedRepoError):
            raise _permanent(
                SOURCE_FORBIDDEN, f"{w} is gated; accept its terms and give the worker an HF_TOKEN"
            ) from e
        if isinstance(e, hfe.RepositoryNotFoundError):
            raise _permanent(
                SOURCE_NOT_FOUND, f"{w}: repository not found (or private: give the worker an HF_TOKEN)"
            ) from e
        if isinstance(e, (hfe.EntryNotFoundError, hfe.RemoteEntryNotFoundError)):
            raise _permanent(FILE_MISSING, f"{w}: file not found at the Hub") from e
        if isinstance(e, hfe.OfflineModeIsEnabled):
            raise _permanent(
                OFFLINE_NOT_CACHED, f"{w}: Hub offline mode is on and the file is not cached"
            ) from e
        if isinstance(e, hfe.HfHubHTTPError):
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status in (401, 403):
                raise _permanent(
                    SOURCE_FORBIDDEN, f"{w}: the Hub refused access (HTTP {status}); check HF_TOKEN"
                ) from e
            if status == 404:
                raise _permanent(SOURCE_NOT_FOUND, f"{w}: not found at the Hub (HTTP 404)") from e
            raise _temporary(SOURCE_UNREACHABLE, f"{w}: the Hub answered HTTP {status}") from e
        if isinstance(e, (OSError, _transport_errors())):
            raise _temporary(SOURCE_UNREACHABLE, f"{w}: cannot reach the Hub at {_short(e)}") from e
        return False


def _transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's transport errors, whichever httpx flavour huggingface_hub uses."""
    import importlib

    from huggingface_hub import get_session

    out: list[type[BaseException]] = []
    mod = importlib.import_module(type(get_session()).__module__.split(".")[0])
    for name in ("TransportError", "TimeoutException", "StreamError"):
        cls = getattr(mod, name, None)
        if isinstance(cls, type):
            out.append(cls)
    return tuple(out)


def _short(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:300]


# --- S3 ------------------------------------------------------------------------------------------
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


class _s3_errors:
    """Map botocore failures to named source errors."""

    def __init__(self, where: str, endpoint: str | None) -> None:
        self.where, self.endpoint = where, endpoint or "AWS S3"

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: object) -> bool:
        if e is None or isinstance(e, LoraplaneError):
            return False
        from botocore import exceptions as bce

        w = self.where
        if isinstance(e, bce.NoCredentialsError):
            raise _permanent(
                SOURCE_FORBIDDEN, f"{w}: no S3 credentials found; mount them as AWS_* env or a profile"
            ) from e
        if isinstance(e, bce.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("NoSuchBucket", "NoSuchKey", "404", "NotFound"):
                raise _permanent(SOURCE_NOT_FOUND, f"{w}: not found ({code})") from e
            if code in ("PreconditionFailed", "412"):
                raise _temporary(SOURCE_CHANGED, f"{w} changed since it was resolved; resolving again") from e
            if (
                code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403")
                or status == 403
            ):
                raise _permanent(
                    SOURCE_FORBIDDEN, f"{w}: S3 refused access ({code}); check the credentials"
                ) from e
            raise _temporary(SOURCE_UNREACHABLE, f"{w}: S3 answered {code or status}") from e
        if isinstance(e, (bce.EndpointConnectionError, bce.ConnectionError, bce.HTTPClientError, OSError)):
            raise _temporary(SOURCE_UNREACHABLE, f"{w}: cannot reach {self.endpoint}: {_short(e)}") from e
        return False


def _resolve_s3(location: str, settings: SourceSettings) -> ResolvedSource:
    bucket, _, prefix = location.partition("/")
    uri = f"s3://{location}"
    client = _s3_client(settings)
    listing_prefix = f"{prefix}/" if prefix else ""
    present: dict[str, RemoteFile] = {}
    names: set[str] = set()
    with _s3_errors(uri, settings.s3_endpoint_url):
        resp = client.list_objects_v2(Bucket=bucket, Prefix=listing_prefix, Delimiter="/", MaxKeys=1000)
    for obj in resp.get("Contents", []):
        name = obj["Key"][len(listing_prefix) :]
        names.add(name)
        if name in ADAPTER_FILES:
            present[name] = RemoteFile(name, int(obj["Size"]), str(obj["ETag"]).strip('"'))
    if not names:
        raise _permanent(SOURCE_NOT_FOUND, f"{uri}: no objects under this prefix")
    files = _check_listing(uri, present, names, settings)
    digest = hashlib.sha256("".join(f"{f.name}\0{f.size}\0{f.etag}\n" for f in files).encode()).hexdigest()[
        :40
    ]
    return _make("s3", uri, digest, files, None)


# --- fetching ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Fetched:
    """What fetch_file wrote: byte count and the sha256 computed while streaming."""

    size: int
    sha256: str


ProgressFn = Callable[[int, int], None]
"""progress(bytes_so_far, total_bytes)."""


def fetch_file(
    resolved: ResolvedSource,
    name: str,
    dest: BinaryIO,
    settings: SourceSettings,
    *,
    progress: ProgressFn | None = None,
    max_bytes: int | None = None,
) -> Fetched:
    """Stream one adapter file of ``resolved`` into ``dest``, verifying size and any known checksum.

    Never writes more than the expected size (nor ``max_bytes``). The caller owns ``dest``
    (a temp file: atomicity is the cache's job).

    Raises:
        SourceError: SourceUnreachable / SourceChanged / ChecksumMismatch (retry), SourceNotFound,
            FileMissing, TooLarge.
    """
    rf = resolved.file(name)
    limit = min(rf.size, max_bytes if max_bytes is not None else settings.max_file_bytes)
    if rf.size > limit:
        raise _permanent(
            TOO_LARGE, f"{resolved.uri}: {name} is {rf.size} bytes, above the limit of {limit} bytes"
        )
    sha = hashlib.sha256()
    md5 = hashlib.md5(usedforsecurity=False) if _plain_md5(resolved, rf) else None
    written = 0
    where = f"{resolved.uri}/{name}"
    for chunk in _chunks(resolved, rf, settings):
        written += len(chunk)
        if written > rf.size:
            raise _temporary(
                SOURCE_CHANGED, f"{where}: more than the {rf.size} bytes resolved; it changed at the source"
            )
        sha.update(chunk)
        if md5 is not None:
            md5.update(chunk)
        dest.write(chunk)
        if progress is not None:
            progress(written, rf.size)
    if written != rf.size:
        raise _temporary(
            SOURCE_CHANGED,
            f"{where}: got {written} of {rf.size} bytes; it changed at the source or the transfer broke",
        )
    digest = sha.hexdigest()
    if rf.sha256 and digest != rf.sha256:
        raise _temporary(CHECKSUM_MISMATCH, f"{where}: sha256 {digest} differs from the source's {rf.sha256}")
    if md5 is not None and md5.hexdigest() != rf.etag:
        raise _temporary(
            CHECKSUM_MISMATCH, f"{where}: MD5 {md5.hexdigest()} differs from the S3 ETag {rf.etag}"
        )
    return Fetched(written, digest)


def _plain_md5(resolved: ResolvedSource, rf: RemoteFile) -> bool:
    """S3 ETags are the MD5 of the bytes unless the object was a multipart upload ("...-N")."""
    return (
        resolved.kind == "s3" and rf.etag is not None and re.fullmatch(r"[0-9a-f]{32}", rf.etag) is not None
    )


def _chunks(
    resolved: ResolvedSource, rf: RemoteFile, settings: SourceSettings
) -> Iterator[bytes | memoryview]:
    if resolved.local_dir is not None:
        yield from _local_chunks(resolved, rf)
    elif resolved.kind == "s3":
        yield from _s3_chunks(resolved, rf, settings)
    elif resolved.kind == "hf":
        yield from _hf_chunks(resolved, rf, settings)
    else:
        raise _permanent(INVALID_PATH, f"{resolved.uri}: unknown source kind {resolved.kind!r}")


def _local_chunks(resolved: ResolvedSource, rf: RemoteFile) -> Iterator[memoryview]:
    path = Path(resolved.local_dir or "") / rf.name
    try:
        f = open(path, "rb")
    except FileNotFoundError as e:
        raise _permanent(FILE_MISSING, f"{resolved.uri}/{rf.name} disappeared after it was resolved") from e
    except OSError as e:
        raise _temporary(SOURCE_UNREACHABLE, f"{resolved.uri}/{rf.name}: {e.strerror}") from e
    try:
        buf = bytearray(_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            yield view[:n]
    finally:
        f.close()


def _s3_chunks(resolved: ResolvedSource, rf: RemoteFile, settings: SourceSettings) -> Iterator[bytes]:
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
                raise _permanent(FILE_MISSING, f"{where} disappeared after it was resolved ({code})") from e
            raise
        try:
            yield from body.iter_chunks(_CHUNK)
        finally:
            body.close()


def _hf_chunks(resolved: ResolvedSource, rf: RemoteFile, settings: SourceSettings) -> Iterator[bytes]:
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    repo_id = resolved.uri[5:]
    url = hf_hub_url(repo_id, rf.name, revision=resolved.resolved_revision, endpoint=_hf_endpoint(settings))
    headers = build_hf_headers(token=settings.hf_token)
    where = f"{resolved.uri}@{resolved.resolved_revision[:12]}/{rf.name}"
    with _hf_errors(where):
        with get_session().stream(
            "GET", url, headers=headers, follow_redirects=True, timeout=settings.timeout_s
        ) as resp:
            if resp.status_code == 404:
                raise _permanent(FILE_MISSING, f"{where} disappeared after it was resolved (HTTP 404)")
            hf_raise_for_status(resp)
            yield from resp.iter_bytes(_CHUNK)
