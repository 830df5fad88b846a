"""glibc malloc on an engine process: large tensors stay out of the heap, so freed activations go back to the OS.

glibc serves an allocation above M_MMAP_THRESHOLD with its own mapping and unmaps it on free; below
the threshold it comes from the heap, which rarely shrinks. The threshold starts at 128 KiB but rises
to the size of every mapped block that is freed (up to 32 MiB), so after the first prefill steps
torch's CPU activations (MiBs each) all come from the heap, and the heap keeps the largest step's
worth of free blocks resident: 100-160 MiB of a serving process's peak at the benchmark shape. A
fixed threshold stops that rise; decode steps allocate below it and are unaffected.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 1 << 20


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold for this process; False where the C library is not glibc."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt with this meaning
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
