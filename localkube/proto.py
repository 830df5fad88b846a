"""Decoding of the few protobuf bodies kubectl sends: `kubectl create namespace|configmap|secret|sa`.

kubectl's typed clients send built-in kinds as Kubernetes protobuf (magic `k8s\\0` + runtime.Unknown).
Only the kinds and fields those generators fill are mapped; anything else stays a 415, as before.
"""

from __future__ import annotations

import base64
from typing import Any

MAGIC = b"k8s\x00"
Fields = dict[int, tuple[str, Any]]


class ProtoError(ValueError):
    """A body that is not Kubernetes protobuf of a kind this module knows."""


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf):
            raise ProtoError("truncated varint")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    out = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, i = _varint(buf, i)
        elif wt == 2:
            n, i = _varint(buf, i)
            val, i = buf[i : i + n], i + n
        elif wt == 1:
            val, i = buf[i : i + 8], i + 8
        elif wt == 5:
            val, i = buf[i : i + 4], i + 4
        else:
            raise ProtoError(f"unsupported wire type {wt}")
        out.append((num, wt, val))
    return out


STR, INT, BOOL, BYTES = "str", "int", "bool", "bytes"
OWNER: Fields = {
    1: ("kind", STR),
    3: ("name", STR),
    4: ("uid", STR),
    5: ("apiVersion", STR),
    6: ("controller", BOOL),
    7: ("blockOwnerDeletion", BOOL),
}
META: Fields = {
    1: ("name", STR),
    2: ("generateName", STR),
    3: ("namespace", STR),
    5: ("uid", STR),
    6: ("resourceVersion", STR),
    7: ("generation", INT),
    11: ("labels", ("map", STR)),
    12: ("annotations", ("map", STR)),
    13: ("ownerReferences", ("list", OWNER)),
    14: ("finalizers", ("list", STR)),
}
OBJREF: Fields = {
    1: ("kind", STR),
    2: ("namespace", STR),
    3: ("name", STR),
    4: ("uid", STR),
    5: ("apiVersion", STR),
}
KINDS: dict[str, Fields] = {
    "Namespace": {1: ("metadata", META), 2: ("spec", {1: ("finalizers", ("list", STR))})},
    "ConfigMap": {
        1: ("metadata", META),
        2: ("data", ("map", STR)),
        3: ("binaryData", ("map", BYTES)),
        4: ("immutable", BOOL),
    },
    "Secret": {
        1: ("metadata", META),
        2: ("data", ("map", BYTES)),
        3: ("type", STR),
        4: ("stringData", ("map", STR)),
        5: ("immutable", BOOL),
    },
    "ServiceAccount": {
        1: ("metadata", META),
        2: ("secrets", ("list", OBJREF)),
        3: ("imagePullSecrets", ("list", {1: ("name", STR)})),
        4: ("automountServiceAccountToken", BOOL),
    },
}


def _scalar(kind: Any, wt: int, val: Any) -> Any:
    if kind == STR:
        return bytes(val).decode()
    if kind == BYTES:
        return base64.b64encode(bytes(val)).decode()
    if kind == INT:
        return int(val)
    if kind == BOOL:
        return bool(val)
    if isinstance(kind, dict):
        return _message(bytes(val), kind)
    raise ProtoError(f"unknown field kind {kind!r}")


def _message(buf: bytes, schema: Fields) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for num, wt, val in _fields(buf):
        if num not in schema:
            continue
        name, kind = schema[num]
        if isinstance(kind, tuple) and kind[0] == "map":
            entry = {n: v for n, _, v in _fields(bytes(val))}
            out.setdefault(name, {})[bytes(entry.get(1, b"")).decode()] = _scalar(
                kind[1], 2, entry.get(2, b"")
            )
        elif isinstance(kind, tuple) and kind[0] == "list":
            out.setdefault(name, []).append(_scalar(kind[1], wt, val))
        else:
            out[name] = _scalar(kind, wt, val)
    return out


def decode(body: bytes) -> dict[str, Any]:
    """Decode a `k8s\\0`-framed runtime.Unknown carrying one of KINDS into its JSON form."""
    if not body.startswith(MAGIC):
        raise ProtoError("missing protobuf magic")
    unknown = {n: v for n, _, v in _fields(body[len(MAGIC) :])}
    tm = {n: bytes(v).decode() for n, _, v in _fields(bytes(unknown.get(1, b"")))}
    api_version, kind = tm.get(1, ""), tm.get(2, "")
    if kind not in KINDS:
        raise ProtoError(f"protobuf bodies of kind {kind!r} are not supported")
    obj = {"apiVersion": api_version, "kind": kind}
    obj.update(_message(bytes(unknown.get(2, b"")), KINDS[kind]))
    return obj


def _key(num: int, wire: int) -> bytes:
    return _uvarint(num << 3 | wire)


def _uvarint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _bytes_field(num: int, data: bytes) -> bytes:
    return _key(num, 2) + _uvarint(len(data)) + data


def _str(num: int, text: str) -> bytes:
    return _bytes_field(num, text.encode())


def encode_status(status: dict[str, Any]) -> bytes:
    """A meta/v1 Status as kube-apiserver sends it to a protobuf client (k8s\\0 + runtime.Unknown)."""
    details = status.get("details") or {}
    d = b""
    for num, key in ((1, "name"), (2, "group"), (3, "kind")):
        d += _str(num, str(details.get(key, "")))
    for cause in details.get("causes") or []:
        c = (
            _str(1, cause.get("reason", ""))
            + _str(2, cause.get("message", ""))
            + _str(3, cause.get("field", ""))
        )
        d += _bytes_field(4, c)
    d += (
        _key(5, 0) + _uvarint(int(details.get("retryAfterSeconds", 0))) + _str(6, str(details.get("uid", "")))
    )
    raw = _bytes_field(1, b"") + _str(2, status.get("status", "")) + _str(3, status.get("message", ""))
    raw += _str(4, status.get("reason", "")) + (_bytes_field(5, d) if status.get("details") else b"")
    raw += _key(6, 0) + _uvarint(int(status.get("code", 0)))
    type_meta = _str(1, "v1") + _str(2, "Status")
    return MAGIC + _bytes_field(1, type_meta) + _bytes_field(2, raw) + _str(3, "") + _str(4, "")
