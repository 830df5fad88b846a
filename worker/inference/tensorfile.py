"""A safetensors file read without torch: its header checked as the loader checks it, its values scanned.

One reader for every safetensors file the worker touches (adapter weights in the cache and at
validation, the base checkpoint's shards in the engine), so a file that passes here is one the
loader takes: the header is a JSON object of known dtypes whose tensors tile the data region
exactly, with no gap, overlap or trailing bytes (the ``safetensors`` library refuses those as
"file not fully covered"). ``parse_header`` works on the first bytes alone, so a download can be
stopped as soon as they arrive. ``nonfinite`` finds NaN / Inf from the exponent bits, in pure Python.
"""

from __future__ import annotations

import array
import json
import math
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplane.errors import PermanentError

MAX_HEADER_BYTES = 16 << 20  # a LoRA header lists a few hundred tensors: ~100 KiB; 16 MiB is generous
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}  # fmt: skip
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")
"""Dtypes that hold LoRA weights; the rest (ints, bool, fp8) would be read as numbers they are not."""

TRUNCATED_WEIGHTS = "TruncatedWeights"
HEADER_TOO_LARGE = "HeaderTooLarge"
MALFORMED_WEIGHTS = "MalformedWeights"


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    """Offset of the first byte in the file (not in the data region)."""
    end: int


@dataclass(frozen=True)
class Header:
    """The tensor table of one safetensors file, already checked against the file's size."""

    tensors: dict[str, Tensor]
    size: int
    """Bytes the whole file must have."""


def header_length(prefix: bytes, name: str, *, cap: int = MAX_HEADER_BYTES) -> int:
    """Bytes of prefix the header needs (8 + its declared length); refuses an oversized header at once."""
    if len(prefix) < 8:
        raise PermanentError(TRUNCATED_WEIGHTS, f"{name} is {len(prefix)} bytes: too short to be safetensors")
    (n,) = struct.unpack("<Q", prefix[:8])
    if n > cap:
        raise PermanentError(
            HEADER_TOO_LARGE,
            f"{name} declares a {n}-byte header, above the {cap}-byte limit; refusing to read it",
        )
    return 8 + n


def parse_header(prefix: bytes, name: str, size: int, *, cap: int = MAX_HEADER_BYTES) -> Header:
    """The header in ``prefix`` (the file's first bytes) for a file of ``size`` bytes.

    Raises PermanentError TruncatedWeights / HeaderTooLarge / MalformedWeights naming the file.
    """
    need = header_length(prefix, name, cap=cap)
    if need > size or len(prefix) < need:
        raise PermanentError(
            TRUNCATED_WEIGHTS,
            f"{name} declares a {need - 8}-byte header but the file is {size} bytes: it is truncated",
        )
    raw = prefix[8:need]
    if not raw.startswith(b"{"):
        raise PermanentError(MALFORMED_WEIGHTS, f"{name}: the safetensors header is not a JSON object")
    try:
        table = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError; deep nesting recurses
        raise PermanentError(
            MALFORMED_WEIGHTS, f"{name} has an unreadable safetensors header: {_short(e)}"
        ) from e
    if not isinstance(table, dict):
        raise PermanentError(MALFORMED_WEIGHTS, f"{name}: the safetensors header is not a JSON object")
    meta = table.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise PermanentError(MALFORMED_WEIGHTS, f"{name}: __metadata__ must map names to strings")
    tensors = {key: _entry(name, key, entry, need) for key, entry in table.items()}
    # The tensors must tile the data region: what safetensors' loader calls "fully covered".
    at = need
    for t in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if t.start != at:
            what = "overlaps another" if t.start < at else f"leaves {t.start - at} unused bytes before it"
            raise PermanentError(
                MALFORMED_WEIGHTS, f"{name}: tensor {t.name!r} {what}; not a valid safetensors file"
            )
        at = t.end
    if at > size:
        raise PermanentError(
            TRUNCATED_WEIGHTS, f"{name}: its tensors need {at} bytes but the file is {size} bytes: truncated"
        )
    if at < size:
        raise PermanentError(
            MALFORMED_WEIGHTS,
            f"{name} has {size - at} bytes after its last tensor (file not fully covered); re-save it",
        )
    return Header(tensors, size)


def _entry(name: str, key: str, entry: Any, base: int) -> Tensor:
    try:
        dtype = entry["dtype"]
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        if dtype not in DTYPE_BYTES or not all(type(d) is int and d >= 0 for d in (*shape, begin, end)):
            raise ValueError(f"dtype {dtype!r}, shape {list(shape)}, offsets {[begin, end]}")
    except (KeyError, TypeError, ValueError) as e:
        raise PermanentError(
            MALFORMED_WEIGHTS, f"{name}: tensor {key!r} has a malformed entry ({_short(e)})"
        ) from e
    if end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise PermanentError(
            MALFORMED_WEIGHTS, f"{name}: tensor {key!r} has offsets that do not match its shape"
        )
    return Tensor(key, dtype, shape, base + begin, base + end)


def read_header(path: Path, *, cap: int = MAX_HEADER_BYTES) -> Header:
    """The checked header of a safetensors file on disk."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        need = header_length(prefix, path.name, cap=cap)
        prefix += f.read(min(need, size) - 8)
    return parse_header(prefix, path.name, size, cap=cap)


# Where the exponent of each float lives (little-endian): byte index and mask of its high bits, and of
# its low bits (None when the high byte holds all of them). All ones there is Inf or NaN.
_EXPONENT = {"F64": (8, 7, 0x7F, 6, 0xF0), "F32": (4, 3, 0x7F, 2, 0x80),
             "BF16": (2, 1, 0x7F, 0, 0x80), "F16": (2, 1, 0x7C, None, 0)}  # fmt: skip
_CHUNK = 16 << 20  # a multiple of every width


def _ones(mask: int) -> bytes:
    return bytes(1 if b & mask == mask else 0 for b in range(256))


_TABLES = {
    dtype: (_ones(hi_mask), _ones(lo_mask)) for dtype, (_, _, hi_mask, _, lo_mask) in _EXPONENT.items()
}


def nonfinite(path: Path, header: Header) -> list[str]:
    """Names of the float tensors holding any NaN or Inf (reads every value, in chunks)."""
    bad = []
    with open(path, "rb") as f:
        for t in header.tensors.values():
            if t.dtype not in _EXPONENT:
                continue
            width, hi, _, lo, _ = _EXPONENT[t.dtype]
            hi_table, lo_table = _TABLES[t.dtype]
            f.seek(t.start)
            for off in range(t.start, t.end, _CHUNK):
                data = f.read(min(_CHUNK, t.end - off))
                top = data[hi::width].translate(hi_table)
                if 1 not in top:
                    continue  # the common case: no value near the top of the exponent range
                if lo is None or int.from_bytes(top, "little") & int.from_bytes(
                    data[lo::width].translate(lo_table), "little"
                ):
                    bad.append(t.name)
                    break
    return bad


_NO_SIGN = bytes(b & 0x7F for b in range(256))


def max_abs_bound(path: Path, t: Tensor) -> float:
    """An upper bound of a float tensor's largest absolute value, within a factor of 4 (F16: 2), from
    the top byte of each value alone: the sign and the exponent's high bits."""
    width, hi, *_ = _EXPONENT[t.dtype]
    top = 0
    with open(path, "rb") as f:
        f.seek(t.start)
        for off in range(t.start, t.end, _CHUNK):
            data = f.read(min(_CHUNK, t.end - off))
            high = data[hi::width].translate(_NO_SIGN)
            # The largest byte, found by memchr from the top (max() over bytes is 4x slower).
            top = next((v for v in range(127, top, -1) if bytes((v,)) in high), top)
    if t.dtype == "F16":  # 5 exponent bits under the sign
        return 2.0 ** ((top >> 2) - 14)
    if t.dtype == "F64":  # the top 7 of 11 exponent bits
        return math.ldexp(1.0, min(16 * top + 15 - 1022, 1024)) if top < 0x7F else math.inf
    return 2.0 ** (2 * top + 1 - 126)  # F32 and BF16: the top 7 of 8 exponent bits


def values(path: Path, t: Tensor) -> Sequence[float]:
    """The values of one float tensor (F64, F32, F16 or BF16), in file order, without torch."""
    with open(path, "rb") as f:
        f.seek(t.start)
        data = f.read(t.end - t.start)
    if t.dtype == "F16":
        return struct.unpack(f"<{len(data) // 2}e", data)
    if t.dtype == "BF16":  # the top half of a float32: put two zero bytes under each value
        wide = bytearray(2 * len(data))
        wide[2::4], wide[3::4] = data[0::2], data[1::2]
        data = bytes(wide)
    out = array.array("d" if t.dtype == "F64" else "f", data)
    if sys.byteorder != "little":
        out.byteswap()
    return out


def _short(e: BaseException) -> str:
    return (str(e) or type(e).__name__)[:200]
