"""Hugging Face Hub sources: a repo and revision resolved to a commit, adapter files streamed from it.

Metadata comes from the real huggingface_hub client (``HfApi.model_info`` with ``files_metadata``),
pointed at ``SourceSettings.hf_endpoint`` (default: HF_ENDPOINT); files are streamed from
``/{repo}/resolve/{commit}/{file}`` with huggingface_hub's session and auth headers, so the cache
sees bytes as they arrive and can verify the LFS sha256. The token comes from the settings or
HF_TOKEN and is never logged. In offline mode (HF_HUB_OFFLINE) a revision resolves from the
resolutions recorded while online (``state_dir``) or from a pre-seeded huggingface_hub cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from loraplane.errors import LoraplaneError
from loraplane.worker.sources.refs import (
    FILE_MISSING,
    LISTED_FILES,
    OFFLINE_NOT_CACHED,
    PICKLE_FILE,
    REVISION_NOT_FOUND,
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

log = logging.getLogger(__name__)
_COMMIT = re.compile(r"[0-9a-f]{40}")


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


def resolve(repo_id: str, revision: str | None, settings: SourceSettings) -> ResolvedSource:
    uri = f"hf://{repo_id}"
    if _hf_offline(settings):
        return resolve_offline(repo_id, uri, revision, settings)
    from huggingface_hub import HfApi

    api = HfApi(endpoint=_hf_endpoint(settings), token=settings.hf_token)
    where = f"{uri}@{revision or 'main'}"
    try:
        with _hf_errors(where, _hf_endpoint(settings)):
            info = api.model_info(repo_id, revision=revision, files_metadata=True, timeout=settings.timeout_s)
    except LoraplaneError as e:
        # A commit never changes: if the Hub is down, what was recorded for it is still exact.
        pinned = _recorded(settings, uri, revision) if revision and _COMMIT.fullmatch(revision) else None
        if e.reason == SOURCE_UNREACHABLE and pinned is not None:
            log.warning("%s; using the recorded resolution of pinned commit %s", e, revision)
            return pinned
        raise
    present: dict[str, RemoteFile] = {}
    names: set[str] = set()
    for s in info.siblings or []:
        names.add(s.rfilename)
        if s.rfilename in LISTED_FILES:
            lfs = s.lfs
            size = lfs.size if lfs is not None else s.size
            if size is None:
                raise temporary(
                    SOURCE_UNREACHABLE, f"{where}: the Hub did not report the size of {s.rfilename}"
                )
            present[s.rfilename] = RemoteFile(s.rfilename, int(size), s.blob_id, lfs.sha256 if lfs else None)
    files = check_listing(uri, present, names, settings)
    if not info.sha:
        raise temporary(SOURCE_UNREACHABLE, f"{where}: the Hub did not report a commit sha")
    resolved = make_resolved("hf", uri, info.sha, files, revision)
    _record(settings, resolved)
    return resolved


def resolve_offline(repo_id: str, uri: str, revision: str | None, settings: SourceSettings) -> ResolvedSource:
    recorded = _recorded(settings, uri, revision)
    if recorded is not None:
        return recorded
    # A pre-seeded huggingface_hub cache (e.g. `hf download` into HF_HUB_CACHE) also serves.
    from huggingface_hub import try_to_load_from_cache

    found: dict[str, Path] = {}
    for name in (*LISTED_FILES, PICKLE_FILE):
        hit = try_to_load_from_cache(repo_id, name, cache_dir=settings.hf_cache_dir, revision=revision)
        if isinstance(hit, str):
            found[name] = Path(hit)
    if not found:
        raise permanent(
            OFFLINE_NOT_CACHED,
            f"{uri}@{revision or 'main'} is not in the local caches and Hub offline mode is on; "
            "unset HF_HUB_OFFLINE or pre-seed the cache",
        )
    snapshot = next(iter(found.values())).parent
    present = {n: RemoteFile(n, p.stat().st_size) for n, p in found.items() if n in LISTED_FILES}
    files = check_listing(uri, present, set(found), settings)
    return make_resolved("hf", uri, snapshot.name, files, revision, local_dir=str(snapshot))


class _hf_errors(ClientErrors):
    """Map huggingface_hub and HTTP-client failures to named source errors."""

    def translate(self, e: BaseException) -> None:
        from huggingface_hub import errors as hfe

        w = self.where
        if isinstance(e, hfe.RevisionNotFoundError):
            raise permanent(
                REVISION_NOT_FOUND, f"{w}: no such revision; give a branch, tag or commit that exists"
            ) from e
        if isinstance(e, hfe.GatedRepoError):
            raise permanent(
                SOURCE_FORBIDDEN, f"{w} is gated; accept its terms and give the worker an HF_TOKEN"
            ) from e
        if isinstance(e, hfe.RepositoryNotFoundError):
            raise permanent(
                SOURCE_NOT_FOUND, f"{w}: repository not found (or private: give the worker an HF_TOKEN)"
            ) from e
        if isinstance(e, (hfe.EntryNotFoundError, hfe.RemoteEntryNotFoundError)):
            raise permanent(FILE_MISSING, f"{w}: file not found at the Hub") from e
        if isinstance(e, hfe.OfflineModeIsEnabled):
            raise permanent(
                OFFLINE_NOT_CACHED, f"{w}: Hub offline mode is on and the file is not cached"
            ) from e
        if isinstance(e, hfe.HfHubHTTPError):
            status = getattr(getattr(e, "response", None), "status_code", None)
            if status in (401, 403):
                raise permanent(
                    SOURCE_FORBIDDEN, f"{w}: the Hub refused access (HTTP {status}); check HF_TOKEN"
                ) from e
            if status == 404:
                raise permanent(SOURCE_NOT_FOUND, f"{w}: not found at the Hub (HTTP 404)") from e
            raise temporary(SOURCE_UNREACHABLE, f"{w}: the Hub answered HTTP {status}") from e
        if isinstance(e, (OSError, _transport_errors())):
            raise temporary(
                SOURCE_UNREACHABLE, f"{w}: cannot reach the Hub at {self.endpoint}: {short(e)}"
            ) from e
        return None


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


def chunks(resolved: ResolvedSource, rf: RemoteFile, settings: SourceSettings) -> Iterator[bytes]:
    from huggingface_hub import get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    repo_id = resolved.uri[5:]
    url = hf_hub_url(repo_id, rf.name, revision=resolved.resolved_revision, endpoint=_hf_endpoint(settings))
    headers = build_hf_headers(token=settings.hf_token)
    where = f"{resolved.uri}@{resolved.resolved_revision[:12]}/{rf.name}"
    with _hf_errors(where, _hf_endpoint(settings)):
        with get_session().stream(
            "GET", url, headers=headers, follow_redirects=True, timeout=settings.timeout_s
        ) as resp:
            if resp.status_code == 404:
                raise permanent(FILE_MISSING, f"{where} disappeared after it was resolved (HTTP 404)")
            if resp.status_code >= 400:
                resp.read()  # the error mapping reads the body; a streamed response must be read first
            hf_raise_for_status(resp)
            yield from resp.iter_bytes()  # as bytes arrive: no re-chunking copies; progress stays live


def etag_hasher(rf: RemoteFile) -> Hasher | None:
    """The git blob id (sha1 of "blob <size>\\0" + bytes) of a file not in LFS (LFS files carry a sha256)."""
    if rf.sha256 is None and rf.etag is not None and re.fullmatch(r"[0-9a-f]{40}", rf.etag):
        h = hashlib.sha1(usedforsecurity=False)
        h.update(b"blob %d\0" % rf.size)
        return h, "git blob id"
    return None


SOURCE = Source("hf", resolve, chunks, etag_hasher=etag_hasher)
