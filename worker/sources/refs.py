"""What every source kind shares: its registration (Source), settings, the immutable reference a path
resolves to, named failures.

A ``ResolvedSource`` pins the exact bytes (Hub commit sha, S3 ETag digest, local file-stat digest)
and carries the adapter files with their sizes and checksums; its ``cache_key`` is derived from all
that, so a cache entry never changes once written. File names and the file-level reasons
(FileMissing, PickleRefused, TooLarge) are the adapter reader's and basemodel's, not repeated here.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from loraplane.errors import LoraplaneError
from loraplane.worker import chattemplate, redaction
from loraplane.worker.inference.basemodel import FILE_MISSING, TOO_LARGE
from loraplane.worker.inference.peft import (
    ADAPTER_FILES,
    CONFIG_FILE,
    PICKLE_FILE,
    PICKLE_REFUSED,
    SIGNATURE_FILE,
    WEIGHTS_FILE,
)
from loraplane.worker.provenance import SIGNED_FILES as SIGNED_FILES

CHUNK = 4 << 20
# Fetched with the adapter when the source has them: its own chat template (chattemplate.py) and its
# OpenSSF signature (provenance.py). Each is capped at max_config_bytes.
OPTIONAL_FILES = (*chattemplate.FILES, SIGNATURE_FILE)
LISTED_FILES = (*ADAPTER_FILES, *OPTIONAL_FILES)

# --- reasons -------------------------------------------------------------------------------------
INVALID_PATH = "InvalidPath"
PATH_NOT_ALLOWED = "PathNotAllowed"
SYMLINK_ESCAPE = "SymlinkEscape"
SOURCE_NOT_FOUND = "SourceNotFound"
REVISION_NOT_FOUND = "RevisionNotFound"
SOURCE_FORBIDDEN = "SourceForbidden"
SOURCE_UNREACHABLE = "SourceUnreachable"
SOURCE_CHANGED = "SourceChanged"
CHECKSUM_MISMATCH = "ChecksumMismatch"
OFFLINE_NOT_CACHED = "OfflineNotCached"


class SourceError(LoraplaneError):
    """A source could not be resolved or read; ``reason`` says why and ``retry`` whether to try again."""


def permanent(reason: str, message: str) -> SourceError:
    return SourceError(reason, message, retry=False)


def temporary(reason: str, message: str) -> SourceError:
    return SourceError(reason, message, retry=True)


# --- settings and values -------------------------------------------------------------------------
class ClientErrors:
    """``with`` block that re-raises a client library's failure as a named source error.

    Subclasses implement ``translate(e)``: raise the named error, or return to let ``e`` propagate.
    """

    def __init__(self, where: str, endpoint: str) -> None:
        self.where, self.endpoint = where, endpoint

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: object) -> None:
        if e is not None and not isinstance(e, LoraplaneError):
            self.translate(e)

    def translate(self, e: BaseException) -> None:
        raise NotImplementedError


_T = TypeVar("_T")


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
    options: Mapping[str, Any] = field(default_factory=dict)
    """Each registered source's own settings (its ``Source.options`` dataclass), by kind; a kind not
    given here gets that dataclass's defaults."""

    def options_for(self, kind: str, cls: type[_T]) -> _T:
        """The settings of the source ``kind`` (``cls``'s defaults when none were given)."""
        value = self.options.get(kind)
        return value if isinstance(value, cls) else cls()

    def __post_init__(self) -> None:
        redaction.register(self.hf_token)  # a token given as a setting is masked in every log line

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
    version: str | None = None
    """The object version the source pinned at resolve time (a GCS generation); the download asks for it."""


@dataclass(frozen=True)
class ResolvedSource:
    """An immutable reference to one version of an adapter's files."""

    kind: str
    """The source's kind (crds/paths.py FORMS): "hf", "local", "s3", ..."""
    uri: str
    """Normalised source: hf://org/name, file:///abs/dir, s3://bucket/prefix, ..."""
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
    order = {n: i for i, n in enumerate(LISTED_FILES)}
    files.sort(key=lambda f: order.get(f.name, 99))
    # A source that gained a signature is a new cache entry even where its revision did not move.
    extra = "".join(f"\0{f.name}" for f in files if f.name not in ADAPTER_FILES)
    key = cache_key_for(kind, uri, rev + extra)
    return ResolvedSource(kind, uri, rev, tuple(files), key, requested, **kw)


def check_listing(
    uri: str, present: dict[str, RemoteFile], names: set[str], settings: SourceSettings
) -> list[RemoteFile]:
    """The adapter files from a listing (and the optional ones it has), or the named failure (pickle only,
    missing, too large)."""
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
    files = [present[n] for n in LISTED_FILES if n in present]
    for f in files:
        limit = settings.max_file_bytes if f.name == WEIGHTS_FILE else settings.max_config_bytes
        if f.size > limit:
            raise permanent(TOO_LARGE, f"{uri}: {f.name} is {f.size} bytes, above the limit of {limit} bytes")
    return files


@dataclass(frozen=True)
class Fetched:
    """What fetch_file wrote: byte count and the sha256 computed while streaming."""

    size: int
    sha256: str


ProgressFn = Callable[[int, int], None]
"""progress(bytes_so_far, total_bytes)."""

Hasher = tuple[Any, str]
"""A hashlib object whose hex digest must equal RemoteFile.etag, and its name for messages."""


def _no_etag_hasher(rf: RemoteFile) -> Hasher | None:
    return None


@dataclass(frozen=True)
class Source:
    """One kind of source: what its module registers in ``loraplane.worker.sources.SOURCES``.

    ``kind`` is the row of crds/paths.py FORMS whose paths it reads (the grammar is the API's);
    everything else about the kind lives in its module, and the rest of the worker iterates the registry.
    """

    kind: str
    resolve: Callable[[str, str | None, SourceSettings], ResolvedSource]
    """resolve(location, revision, settings): the location is the path without its scheme (crds.paths)."""
    chunks: Callable[[ResolvedSource, RemoteFile, SourceSettings], Iterator[bytes | memoryview]]
    """The bytes of one resolved file, streamed (fetch_file counts, hashes and bounds them)."""
    options: type | None = None
    """A frozen dataclass of this kind's own settings, or None. Each field is a worker setting named
    ``<kind>_<field>``: flag --<kind>-<field>, env LORAPLANE_<KIND>_<FIELD>, config key; the field's
    docstring is its --help. ``__post_init__`` raises ValueError naming the flag for a bad value."""
    etag_hasher: Callable[[RemoteFile], Hasher | None] = _no_etag_hasher
    """A hasher for RemoteFile.etag when the source's ETag is a content hash, else None."""


def short(e: BaseException) -> str:
    """The first line of an exception's text, bounded, for messages."""
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:300]
