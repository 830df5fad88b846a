"""Sets of adapter IDs as compact range strings ("1-40,42,45-50"), in blocks of BLOCK consecutive IDs.

A LoRAWorker reports which IDs it has Ready, Failed or still loading as maps from a block's first ID to
the range string of its members: 10,000 Ready adapters with consecutive IDs take a few hundred bytes,
and a change rewrites only its block's string, so a merge patch of a batch of changes is O(changes).
"""

from __future__ import annotations

from collections.abc import Iterable

BLOCK = 1000  # IDs per block: a block's key is its first ID (0, 1000, 2000, ...) as a string


def block_of(adapter_id: int) -> str:
    return str(adapter_id - adapter_id % BLOCK)


def encode(ids: Iterable[int]) -> str:
    """Sorted, merged ranges: encode([1, 2, 3, 7]) == "1-3,7"."""
    parts: list[str] = []
    start = prev = None
    for i in sorted(set(ids)):
        if prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            parts.append(f"{start}-{prev}" if prev != start else str(start))
        start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else str(start))
    return ",".join(parts)


def decode(text: str) -> list[int]:
    """The IDs in a range string; raises ValueError on anything but "N" and "N-M" items (N <= M)."""
    out: list[int] = []
    for part in text.split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        lo, hi = int(first), int(last or first)
        if lo > hi or lo < 0:
            raise ValueError(f"bad ID range {part!r}")
        out.extend(range(lo, hi + 1))
    return out


def from_blocks(blocks: dict[str, str] | None) -> list[int]:
    return [i for text in (blocks or {}).values() for i in decode(text)]


RANGE_PATTERN = r"^(\d+(-\d+)?)(,\d+(-\d+)?)*$"
