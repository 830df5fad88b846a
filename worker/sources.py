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
import logging
import os
import re
import stat
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
CHUNK = 4 << 20

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


def permanent(reason: str, message: str) -> SourceError:
    return SourceError(reason, message, retry=False)


def temporary(reason: str, message: str) -> SourceError:
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
        raise permanent(FILE_MISSING, f"{self.uri} has no {name}")

    @property
    def size_bytes(self) -> int:
        return sum(f.size for f in self.files)


def cache_key_for(kind: str, uri: str, resolved_revision: str) -> str:
    """A directory name unique to (kind, uri, revision), readable enough to find by eye."""
    digest = hashlib.sha256(f"{kind}\0{uri}\0{resolved_revision}".encode()).hexdigest()[:24]
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", uri.split("://", 1)[-1]).strip("-.")[-48:].strip("-.")
    return f"{kind}-{tail}-{digest}" if tail else f"{kind}-{digest}"


def make_resolved(
    kind: str, uri: str, rev: str, files: list[RemoteFile], requested: str | None, **kw: Any
) -> ResolvedSource:
    order = {n: i for i, n in enumerate(ADAPTER_FILES)}
    files.sort(key=lambda f: order.get(f.name, 99))
    return ResolvedSource(kind, uri, rev, tuple(files), cache_key_for(kind, uri, rev), requested, **kw)


def check_listing(
    uri: str, present: dict[str, RemoteFile], names: set[str], settings: SourceSettings
) -> list[RemoteFile]:
    """The adapter files from a listing, or the named failure (pickle only, missing, too large)."""
    if WEIGHTS_FILE not in present:
        if PICKLE_FILE in names:
            raise permanent(
                PICKLE_REFUSED,
                f"{uri} has {PICKLE_FILE} (pickled weights, never loaded) but no {WEIGHTS_FILE}; "
                "re-save the adapter with save_pretrained(safe_serialization=True)",
            )
        raise permanent(
            FILE_MISSING, f"{uri} has no {WEIGHTS_FILE}; a PEFT LoRA adapter needs {ADAPTER_FILES}"
        )
    if CONFIG_FILE not in present:
        raise permanent(
            FILE_MISSING, f"{uri} has no {CONFIG_FILE}; a PEFT LoRA adapter needs {ADAPTER_FILES}"
        )
    for f, limit in (
        (present[CONFIG_FILE], settings.max_config_bytes),
        (present[WEIGHTS_FILE], settings.max_file_bytes),
    ):
        if f.size > limit:
            raise permanent(TOO_LARGE, f"{uri}: {f.name} is {f.size} bytes, above the limit of {limit} bytes")
    return [present[n] for n in ADAPTER_FILES]


# --- path parsing --------------------------------------------------------------------------------
_REPO_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def parse_path(path: str) -> tuple[str, str]:
    """(kind, location) for a spec.path: ("hf", "org/name"), ("local", "/abs"), ("s3", "bucket/prefix")."""
    if not isinstance(path, str) or not path or path != path.strip() or "\0" in path:
        raise permanent(
            INVALID_PATH, f"path {path!r} is empty or has surrounding spaces; use {ACCEPTED_FORMS}"
        )
    if path.startswith("hf://"):
        kind, rest = "hf", path[5:].strip("/")
    elif path.startswith("s3://"):
        kind, rest = "s3", path[5:]
    elif path.startswith("file://"):
        kind, rest = "local", path[7:]
        if not rest.startswith("/"):
            raise permanent(
                INVALID_PATH, f"{path!r}: file:// needs an absolute path (file:///dir); use {ACCEPTED_FORMS}"
            )
    elif path.startswith("/"):
        kind, rest = "local", path
    elif "://" in path:
        raise permanent(INVALID_PATH, f"{path!r} has an unknown scheme; use {ACCEPTED_FORMS}")
    else:
        kind, rest = "hf", path
    if ".." in PurePosixPath(rest).parts or ".." in rest.split("/"):
        raise permanent(PATH_NOT_ALLOWED, f"{path!r} contains '..'; name the adapter directory directly")
    if kind == "hf" and not _REPO_RE.match(rest):
        raise permanent(
            INVALID_PATH, f"{path!r} is not a Hub repo id (org/name) nor another form; use {ACCEPTED_FORMS}"
        )
    if kind == "s3":
        bucket = rest.split("/", 1)[0]
        if not _BUCKET_RE.match(bucket):
            raise permanent(
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
            raise permanent(INVALID_PATH, f"{path}: a local path has no revisions; remove spec.revision")
        return _resolve_local(location, settings)
    if kind == "s3":
        if revision:
            raise permanent(INVALID_PATH, f"{path}: S3 paths have no revisions; remove spec.revision")
        from loraplane.worker import s3

        return s3.resolve(location, settings)
    from loraplane.worker import hub

    return hub.resolve(location, revision, settings)


# --- local ---------------------------------------------------------------------------------------
def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _resolve_local(location: str, settings: SourceSettings) -> ResolvedSource:
    lexical = Path(os.path.normpath(location))
    uri = f"file://{lexical}"
    if not settings.local_roots:
        raise permanent(PATH_NOT_ALLOWED, f"{uri}: this worker allows no local paths; configure a local root")
    roots = [Path(os.path.abspath(r)) for r in settings.local_roots]  # abspath also normalises
    lexical_root = next((r for r in roots if _under(lexical, r)), None)
    if lexical_root is None:
        shown = ", ".join(str(r) for r in roots)
        raise permanent(
            PATH_NOT_ALLOWED, f"{uri} is outside the allowed local roots ({shown}); move it under one"
        )
    real_root = Path(os.path.realpath(lexical_root))
    real = Path(os.path.realpath(lexical))
    if not _under(real, real_root):
        raise permanent(
            SYMLINK_ESCAPE, f"{uri} resolves through a symlink to {real}, outside the root {lexical_root}"
        )
    if not real.is_dir():
        raise permanent(SOURCE_NOT_FOUND, f"{uri} is not a directory on this worker")
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
            raise permanent(
                SYMLINK_ESCAPE, f"{uri}/{name} is a symlink to {target}, outside the root {lexical_root}"
            )
        try:
            st = target.stat()
        except OSError as e:
            raise permanent(FILE_MISSING, f"{uri}/{name} cannot be read: {e.strerror}") from e
        if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
            raise permanent(FILE_MISSING, f"{uri}/{name} is not a regular file")
        if name in ADAPTER_FILES:
            present[name] = RemoteFile(name, st.st_size)
            stamp.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    files = check_listing(uri, present, names, settings)
    return make_resolved("local", uri, stamp.hexdigest()[:40], files, None, local_dir=str(real))


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
        raise permanent(
            TOO_LARGE, f"{resolved.uri}: {name} is {rf.size} bytes, above the limit of {limit} bytes"
        )
    where = f"{resolved.uri}/{name}"
    fd = _real_fd(dest)
    if resolved.local_dir is not None and fd is not None:
        written, digest = _copy_local(resolved, rf, fd, progress)
        return _verified(where, rf, written, digest, None)
    sha = hashlib.sha256()
    etag_hash = _etag_hasher(resolved, rf)
    written = 0
    for chunk in _chunks(resolved, rf, settings):
        written += len(chunk)
        if written > rf.size:
            raise temporary(
                SOURCE_CHANGED, f"{where}: more than the {rf.size} bytes resolved; it changed at the source"
            )
        sha.update(chunk)
        if etag_hash is not None:
            etag_hash[0].update(chunk)
        dest.write(chunk)
        if progress is not None:
            progress(written, rf.size)
    etag = (etag_hash[0].hexdigest(), etag_hash[1]) if etag_hash is not None else None
    return _verified(where, rf, written, sha.hexdigest(), etag)


def _verified(where: str, rf: RemoteFile, written: int, digest: str, etag: tuple[str, str] | None) -> Fetched:
    """Fetched, once the byte count and every checksum the source gave agree."""
    if written != rf.size:
        raise temporary(
            SOURCE_CHANGED,
            f"{where}: got {written} of {rf.size} bytes; it changed at the source or the transfer broke",
        )
    if rf.sha256 and digest != rf.sha256:
        raise temporary(CHECKSUM_MISMATCH, f"{where}: sha256 {digest} differs from the source's {rf.sha256}")
    if etag is not None and etag[0] != rf.etag:
        raise temporary(
            CHECKSUM_MISMATCH, f"{where}: {etag[1]} {etag[0]} differs from the source's {rf.etag}"
        )
    return Fetched(written, digest)


def _real_fd(dest: BinaryIO) -> int | None:
    """dest's descriptor when it is a real, readable file (the fast local copy hashes what it wrote)."""
    try:
        fd = dest.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    if not getattr(dest, "readable", lambda: False)():
        return None
    dest.flush()
    return fd


def _copy_local(
    resolved: ResolvedSource, rf: RemoteFile, dst_fd: int, progress: ProgressFn | None
) -> tuple[int, str]:
    """Kernel copy + overlapped hash; the source must not change while it is copied."""
    from loraplane.worker import filecopy

    path = Path(resolved.local_dir or "") / rf.name
    where = f"{resolved.uri}/{rf.name}"
    try:
        src = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError as e:
        raise permanent(FILE_MISSING, f"{where} disappeared after it was resolved") from e
    except OSError as e:
        raise temporary(SOURCE_UNREACHABLE, f"{where}: {e.strerror}") from e
    try:
        before = os.fstat(src)
        if before.st_size != rf.size:
            raise temporary(SOURCE_CHANGED, f"{where} is {before.st_size} bytes, not the {rf.size} resolved")
        written, digest = filecopy.copy_and_hash(src, dst_fd, rf.size, progress=progress)
        after = os.fstat(src)
    finally:
        os.close(src)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise temporary(SOURCE_CHANGED, f"{where} changed while it was copied; copying again")
    return written, digest


def _etag_hasher(resolved: ResolvedSource, rf: RemoteFile) -> tuple[Any, str] | None:
    """A hasher whose digest must equal rf.etag, and its name, when the source's ETag is a content hash.

    S3: the MD5 of the bytes unless the object was a multipart upload ("...-N"). The Hub: the git
    blob id (sha1 of "blob <size>\\0" + bytes) for files not in LFS (LFS files carry a sha256)."""
    if rf.etag is None:
        return None
    if resolved.kind == "s3" and re.fullmatch(r"[0-9a-f]{32}", rf.etag):
        return hashlib.md5(usedforsecurity=False), "MD5"
    if resolved.kind == "hf" and rf.sha256 is None and re.fullmatch(r"[0-9a-f]{40}", rf.etag):
        h = hashlib.sha1(usedforsecurity=False)
        h.update(b"blob %d\0" % rf.size)
        return h, "git blob id"
    return None


def _chunks(
    resolved: ResolvedSource, rf: RemoteFile, settings: SourceSettings
) -> Iterator[bytes | memoryview]:
    if resolved.local_dir is not None:
        yield from _local_chunks(resolved, rf)
    elif resolved.kind == "s3":
        from loraplane.worker import s3

        yield from s3.chunks(resolved, rf, settings)
    elif resolved.kind == "hf":
        from loraplane.worker import hub

        yield from hub.chunks(resolved, rf, settings)
    else:
        raise permanent(INVALID_PATH, f"{resolved.uri}: unknown source kind {resolved.kind!r}")


def _local_chunks(resolved: ResolvedSource, rf: RemoteFile) -> Iterator[memoryview]:
    path = Path(resolved.local_dir or "") / rf.name
    try:
        f = open(path, "rb")
    except FileNotFoundError as e:
        raise permanent(FILE_MISSING, f"{resolved.uri}/{rf.name} disappeared after it was resolved") from e
    except OSError as e:
        raise temporary(SOURCE_UNREACHABLE, f"{resolved.uri}/{rf.name}: {e.strerror}") from e
    try:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            yield view[:n]
    finally:
        f.close()


def short(e: BaseException) -> str:
    """The first line of an exception's text, bounded, for messages."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:300]
