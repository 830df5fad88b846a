"""Where adapter weights come from: an adapter's ``spec.path`` resolved to an immutable reference.

``resolve`` turns a path (Hugging Face repo, local directory, S3 prefix) and an optional revision
into a frozen ``ResolvedSource`` (refs.py): the commit sha / ETag digest / file-stat digest that
pins the exact bytes, the adapter files with their sizes and checksums, and a ``cache_key``.
``fetch_file`` streams one of those files into an open file, bounding its size and verifying the
checksum the source gave. One module per kind of source (local, hub, s3; filecopy for local
copies), each declaring a ``SOURCE`` (refs.Source: its kind, client, own settings) registered in
``SOURCES`` below; the path grammar is the API's (one row per kind in crds/paths.py FORMS), so the
worker accepts exactly the paths admission accepts, and ``revision`` is what the CRD says: a Hub
revision, or for the other kinds an opaque version label. The cache (cache.py) owns atomicity,
budgets and retries.

Adding a kind of source: a module with its ``SOURCE``, its name in ``SOURCES``, its row in
crds/paths.py FORMS (then ``loraplane crds --checkout``), and docs. Its settings become worker flags
(settings.py reads them from the registry).
Importing this package scrubs credentials from every log record (redaction.py): the clients below
log signed headers at DEBUG.

Only ``adapter_config.json`` and ``adapter_model.safetensors`` are ever fetched, and when the source has
them the adapter's own chat template (``chat_template.jinja``, ``tokenizer_config.json``) and ``model.sig``
(an OpenSSF model signature, provenance.py); a source that only offers ``adapter_model.bin`` (a pickle) is
refused with ``PickleRefused``.
"""

from __future__ import annotations

import hashlib
import re
from typing import BinaryIO

from loraplane.crds import paths
from loraplane.worker import redaction
from loraplane.worker.sources import gcs, hub, local, s3
from loraplane.worker.sources.refs import CHECKSUM_MISMATCH as CHECKSUM_MISMATCH
from loraplane.worker.sources.refs import CONFIG_FILE as CONFIG_FILE
from loraplane.worker.sources.refs import FILE_MISSING as FILE_MISSING
from loraplane.worker.sources.refs import INVALID_PATH as INVALID_PATH
from loraplane.worker.sources.refs import OFFLINE_NOT_CACHED as OFFLINE_NOT_CACHED
from loraplane.worker.sources.refs import OPTIONAL_FILES as OPTIONAL_FILES
from loraplane.worker.sources.refs import PATH_NOT_ALLOWED as PATH_NOT_ALLOWED
from loraplane.worker.sources.refs import PICKLE_FILE as PICKLE_FILE
from loraplane.worker.sources.refs import PICKLE_REFUSED as PICKLE_REFUSED
from loraplane.worker.sources.refs import REVISION_NOT_FOUND as REVISION_NOT_FOUND
from loraplane.worker.sources.refs import SIGNED_FILES as SIGNED_FILES
from loraplane.worker.sources.refs import SOURCE_CHANGED as SOURCE_CHANGED
from loraplane.worker.sources.refs import SOURCE_FORBIDDEN as SOURCE_FORBIDDEN
from loraplane.worker.sources.refs import SOURCE_NOT_FOUND as SOURCE_NOT_FOUND
from loraplane.worker.sources.refs import SOURCE_UNREACHABLE as SOURCE_UNREACHABLE
from loraplane.worker.sources.refs import SYMLINK_ESCAPE as SYMLINK_ESCAPE
from loraplane.worker.sources.refs import TOO_LARGE as TOO_LARGE
from loraplane.worker.sources.refs import WEIGHTS_FILE as WEIGHTS_FILE
from loraplane.worker.sources.refs import Fetched as Fetched
from loraplane.worker.sources.refs import ProgressFn as ProgressFn
from loraplane.worker.sources.refs import RemoteFile as RemoteFile
from loraplane.worker.sources.refs import ResolvedSource as ResolvedSource
from loraplane.worker.sources.refs import Source as Source
from loraplane.worker.sources.refs import SourceError as SourceError
from loraplane.worker.sources.refs import SourceSettings as SourceSettings
from loraplane.worker.sources.refs import permanent, temporary

redaction.install()  # the sources' client libraries log signed headers at DEBUG: their logs are scrubbed

SOURCES: dict[str, Source] = {m.SOURCE.kind: m.SOURCE for m in (hub, local, s3, gcs)}
"""Every kind of source by its crds/paths.py kind: the registry the worker iterates."""
if set(SOURCES) != set(paths.FORMS_BY_KIND):  # a form without a client, or a client without a form
    raise ImportError(
        f"sources registered {sorted(SOURCES)} but crds/paths.py accepts {sorted(paths.FORMS_BY_KIND)}"
    )


def parse_path(path: str) -> tuple[paths.SourceKind, str]:
    """(kind, location) for a spec.path: ("hf", "org/name"), ("local", "/abs"), ("s3", "bucket/prefix").

    The API's grammar (crds/paths.py): the same paths, refused with the same words as at admission."""
    if not isinstance(path, str) or "\0" in path:
        raise permanent(INVALID_PATH, f"path {path!r} must be a string without NUL bytes")
    problems = paths.path_problems(path)
    if problems:
        reason = PATH_NOT_ALLOWED if re.search(paths.DOT_DOT, path) else INVALID_PATH
        raise permanent(reason, f"{path!r}: " + "; ".join(problems))
    return paths.source_kind(path), paths.location(path)


def resolve(path: str, revision: str | None, settings: SourceSettings) -> ResolvedSource:
    """Resolve an adapter path (and revision) to an immutable reference. Blocking, thread-safe.

    Raises:
        SourceError: with reason InvalidPath, PathNotAllowed, SymlinkEscape, SourceNotFound,
            RevisionNotFound, SourceForbidden, SourceUnreachable (retry), FileMissing, PickleRefused,
            TooLarge, OfflineNotCached.
    """
    kind, location = parse_path(path)
    return SOURCES[kind].resolve(location, revision, settings)


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
        written, digest = local.copy(resolved, rf, fd, progress)
        return _verified(where, rf, written, digest, None)
    sha = hashlib.sha256()
    source = SOURCES.get(resolved.kind)
    if source is None:
        raise permanent(INVALID_PATH, f"{resolved.uri}: unknown source kind {resolved.kind!r}")
    etag_hash = source.etag_hasher(rf) if rf.etag is not None else None
    written = 0
    chunks = (
        local.chunks(resolved, rf)
        if resolved.local_dir is not None
        else source.chunks(resolved, rf, settings)
    )
    for chunk in chunks:
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
