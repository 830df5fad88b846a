"""Local sources: an absolute directory under a configured root, copied into the cache by the kernel.

A path is allowed only under ``SourceSettings.local_roots`` after resolving symlinks (a link that
leads outside is SymlinkEscape); only regular files are read (a FIFO would block forever). The
resolved revision is a digest of (name, size, mtime_ns), so weights rewritten in place are a new
version. Copies go through filecopy (copy_file_range + an overlapped hash of what was written).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from loraplane.worker.sources import filecopy
from loraplane.worker.sources.refs import (
    CHUNK,
    FETCHED_FILES,
    FILE_MISSING,
    PATH_NOT_ALLOWED,
    PICKLE_FILE,
    SOURCE_CHANGED,
    SOURCE_NOT_FOUND,
    SOURCE_UNREACHABLE,
    SYMLINK_ESCAPE,
    ProgressFn,
    RemoteFile,
    ResolvedSource,
    SourceSettings,
    check_listing,
    make_resolved,
    permanent,
    temporary,
)


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve(location: str, revision: str | None, settings: SourceSettings) -> ResolvedSource:
    """``revision`` is an opaque label (the CRD's): recorded, never needed to find the bytes."""
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
    for name in (*FETCHED_FILES, PICKLE_FILE):
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
        if name in FETCHED_FILES:
            present[name] = RemoteFile(name, st.st_size)
            stamp.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    files = check_listing(uri, present, names, settings)
    return make_resolved("local", uri, stamp.hexdigest()[:40], files, revision, local_dir=str(real))


def copy(
    resolved: ResolvedSource, rf: RemoteFile, dst_fd: int, progress: ProgressFn | None
) -> tuple[int, str]:
    """Kernel copy + overlapped hash; the source must not change while it is copied."""
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


def chunks(resolved: ResolvedSource, rf: RemoteFile) -> Iterator[memoryview]:
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
