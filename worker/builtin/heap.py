"""glibc malloc on an engine process: large tensors stay out of the heap, so freed activations go back to the OS.

glibc serves an allocation at or above M_MMAP_THRESHOLD with its own mapping and unmaps it on free;
below the threshold it comes from the heap, which rarely shrinks. The threshold starts at 128 KiB but
rises to the size of every mapped block that is freed (up to 32 MiB), so after the first prefill steps
torch's CPU activations (MiBs each) all come from the heap, and the heap keeps the largest step's
worth of free blocks resident: 100-160 MiB of a serving process's peak at the benchmark shape. A
fixed threshold stops that rise. It must sit above what every decode step allocates, though: the
[batch, vocab] float32 logits and the sampler's tensors of that shape (4 MiB at batch 32 and vocab
32,000) would otherwise be mapped, faulted in and unmapped on every step (1 MiB cost 10-35% of
serving throughput, docs/benchmarks.md). ``step_threshold`` puts it above them. Attention's per-step
K/V gathers (MiBs per layer) are not counted there: ``kvcache.KVCache`` writes them into buffers it
keeps across steps, so once those have grown to the largest step they no longer reach malloc.

``LORAPLANE_MMAP_THRESHOLD`` overrides the choice (for measurement): a byte count, or ``glibc`` to
leave glibc's own rising threshold.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 1 << 20  # the floor: below it glibc's dynamic threshold would be no worse
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's largest (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
ENV = "LORAPLANE_MMAP_THRESHOLD"


def step_threshold(max_seqs: int, vocab_size: int) -> int:
    """Just above a full decode step's [max_seqs, vocab] float32 tensors (sizes are exact, so 2x leaves
    room for the sampler's wider ones), within glibc's bounds."""
    return max(MMAP_THRESHOLD, min(MMAP_THRESHOLD_MAX, 2 * max_seqs * vocab_size * 4))


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold for this process (``LORAPLANE_MMAP_THRESHOLD`` wins over ``threshold``);
    False where it is left alone: the C library is not glibc, or the variable says ``glibc``."""
    chosen = os.environ.get(ENV, "").strip()
    if chosen == "glibc":
        return False
    if chosen:
        threshold = int(chosen)
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):  # musl, macOS: no mallopt with this meaning
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))
