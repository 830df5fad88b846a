"""Merge patch (RFC 7386) and JSON patch (RFC 6902) with kube-apiserver's error answers."""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

from loraplane.localkube.status import ApiError


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: objects merge recursively, null deletes, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict):
            out[k] = merge_patch(out.get(k), v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def json_patch(target: dict[str, Any], ops: Any) -> dict[str, Any]:
    """Apply a JSON patch; any failure (test mismatch, missing path) is a generic 422, as upstream."""
    if not isinstance(ops, list):
        kind = "object" if isinstance(ops, dict) else type(ops).__name__
        raise ApiError(
            400,
            f"error decoding patch: json: cannot unmarshal {kind} into Go value of type []handlers.jsonPatchOp",
        )
    try:
        return jsonpatch.JsonPatch(ops).apply(target, in_place=False)
    except (
        jsonpatch.JsonPatchException,
        jsonpatch.JsonPointerException,
        KeyError,
        IndexError,
        TypeError,
    ) as e:
        del e
        raise ApiError(
            422, "the server rejected our request due to an error in our request", details={}
        ) from None
