"""glibc's mmap threshold as the engine sets it: a full decode step's logits come from the heap (reused
step after step), larger blocks are mapped (given back on free). Checked on real allocations in a
fresh process: the chunk header's IS_MMAPPED bit says where glibc put each block."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

PROBE = """
import ctypes, ctypes.util, sys
from loraplane.worker.builtin import heap

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
print(heap.fix_mmap_threshold(heap.step_threshold(32, 32000)))

def mapped(size):
    p = libc.malloc(size)
    bit = ctypes.c_size_t.from_address(p - ctypes.sizeof(ctypes.c_size_t)).value & 2  # IS_MMAPPED
    libc.free(p)
    return bool(bit)

print(mapped(32 * 32000 * 4), mapped(64 << 20))
"""


def probe(env: dict[str, str]) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_decode_logits_stay_in_the_heap_and_large_blocks_are_mapped() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LORAPLANE_MMAP_THRESHOLD"}
    if probe(env)[0] == "False":
        pytest.skip("not glibc")
    # B=32 x vocab 32,000 float32 logits (4 MiB) from the heap; 64 MiB mapped (freed to the OS).
    assert probe(env) == ["True", "False", "True"]
    # The override: 1 MiB (the former fixed value) maps the logits on every step.
    assert probe({**env, "LORAPLANE_MMAP_THRESHOLD": str(1 << 20)}) == ["True", "True", "True"]
    assert probe({**env, "LORAPLANE_MMAP_THRESHOLD": "glibc"})[0] == "False"
