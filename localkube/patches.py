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


# patchMergeKey of the built-in list fields kubectl's strategic merge patches touch (k8s.io/api tags).
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "imagePullSecrets": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "hostAliases": "ip",
    "conditions": "type",
    "ownerReferences": "uid",
    "topologySpreadConstraints": "topologyKey",
    "resourceClaims": "name",
    "subsets": None,
}
PRIMITIVE_MERGE = {"finalizers"}  # lists of strings merged as sets


def _port_key(items: list[Any]) -> str | None:
    sample = next((i for i in items if isinstance(i, dict)), {})
    if "containerPort" in sample:
        return "containerPort"
    if "port" in sample:
        return "port"
    return None


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Strategic merge patch for built-ins: merge-key lists, $patch, $setElementOrder, $deleteFromPrimitiveList."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if k.startswith("$setElementOrder/") or k == "$retainKeys" or k == "$patch":
            continue
        if k.startswith("$deleteFromPrimitiveList/"):
            field = k.split("/", 1)[1]
            out[field] = [x for x in out.get(field) or [] if x not in v]
            continue
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict):
            out[k] = strategic_merge_patch(out.get(k), v)
        elif isinstance(v, list):
            out[k] = _merge_list(k, out.get(k), v, patch.get(f"$setElementOrder/{k}"))
        else:
            out[k] = copy.deepcopy(v)
    return out


def _merge_list(field: str, current: Any, items: list[Any], order: Any) -> list[Any]:
    current = current if isinstance(current, list) else []
    if field in PRIMITIVE_MERGE:
        return current + [x for x in items if x not in current]
    key = MERGE_KEYS.get(field) if field != "ports" else _port_key(items + current)
    if not key or not all(isinstance(i, dict) and key in i for i in items):
        return [x for x in copy.deepcopy(items) if not (isinstance(x, dict) and x.get("$patch") == "delete")]
    merged = {i.get(key): i for i in current if isinstance(i, dict)}
    for item in items:
        if item.get("$patch") == "delete":
            merged.pop(item.get(key), None)
        else:
            merged[item[key]] = strategic_merge_patch(merged.get(item[key]), item)
    if isinstance(order, list):
        ranked = [o.get(key) if isinstance(o, dict) else o for o in order]
        rank = {k: i for i, k in enumerate(ranked)}
        return sorted(merged.values(), key=lambda i: rank.get(i.get(key), len(rank)))
    return list(merged.values())
