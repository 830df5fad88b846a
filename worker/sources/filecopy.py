"""Copy a local file into the cache as fast as a plain copy, while hashing what was written.

A Python read/hash/write loop runs at the speed of one core doing three things in turn. Here the
kernel copies (copy_file_range: no bytes through user space, a reflink on filesystems that can)
in one thread and then starts the flush to disk (fdatasync), while the calling thread hashes the
bytes *as written to the destination*, trailing just behind the copier, so the digest describes the
cache entry itself, not a source that might be rewritten meanwhile. hashlib and the syscalls
release the GIL, so the three overlap.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Callable

STEP = 8 << 20  # bytes per copy / hash step: large enough to amortise calls, small enough to overlap
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF, errno.EPERM}


def copy_and_hash(
    src_fd: int,
    dst_fd: int,
    size: int,
    *,
    progress: Callable[[int, int], None] | None = None,
    sync: bool = True,
) -> tuple[int, str]:
    """Copy up to ``size`` bytes from src_fd (offset 0) to dst_fd (offset 0); return (bytes, sha256 hex).

    Fewer than ``size`` bytes come back when the source is shorter. ``dst_fd`` must be readable
    (the digest is computed from the destination). With ``sync`` the data is fdatasync'ed
    before returning, overlapped with the hashing.
    """
    cond = threading.Condition()
    state: dict[str, object] = {"copied": 0, "done": False, "error": None}

    def copier() -> None:
        try:
            off = 0
            kernel = True
            while off < size:
                want = min(STEP, size - off)
                if kernel:
                    try:
                        n = os.copy_file_range(src_fd, dst_fd, want, off, off)
                    except OSError as e:
                        if e.errno not in _UNSUPPORTED or off:
                            raise
                        kernel = False
                        continue
                else:
                    data = os.pread(src_fd, want, off)
                    n = os.pwrite(dst_fd, data, off) if data else 0
                if n == 0:
                    break
                off += n
                with cond:
                    state["copied"] = off
                    cond.notify()
            if sync:
                os.fdatasync(dst_fd)
        except BaseException as e:  # handed to the caller's thread
            state["error"] = e
        finally:
            with cond:
                state["done"] = True
                cond.notify()

    thread = threading.Thread(target=copier, name="cache-copy", daemon=True)
    thread.start()
    h = hashlib.sha256()
    buf = bytearray(STEP)
    view = memoryview(buf)
    hashed = 0
    try:
        while True:
            with cond:
                while state["copied"] == hashed and not state["done"]:
                    cond.wait(1.0)
                target = int(state["copied"])  # type: ignore[call-overload]
                done = bool(state["done"])
            while hashed < target:
                n = os.preadv(dst_fd, [view[: min(STEP, target - hashed)]], hashed)
                if n <= 0:
                    raise OSError(errno.EIO, "short read of the bytes just written")
                h.update(view[:n])
                hashed += n
                if progress is not None:
                    progress(hashed, size)
            if done and hashed >= int(state["copied"]):  # type: ignore[call-overload]
                break
    finally:
        thread.join()
    if state["error"] is not None:
        raise state["error"]  # type: ignore[misc]
    return hashed, h.hexdigest()
