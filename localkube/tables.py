"""Server-side Table output (meta.k8s.io/v1 Table) from a CRD's additionalPrinterColumns.

`kubectl get` asks for Tables; the columns and cells here are what kube-apiserver sends, so a user sees
the same IDs and phases as on a real cluster.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

from loraplane.localkube.resources import ResourceType

Obj = dict[str, Any]
NAME_COLUMN = {
    "name": "Name",
    "type": "string",
    "format": "name",
    "description": "Name must be unique within a namespace. Is required when creating resources, although some "
    "resources may allow a client to request the generation of an appropriate name automatically. Name is "
    "primarily intended for creation idempotence and configuration definition. Cannot be updated. More info: "
    "https://kubernetes.io/docs/concepts/overview/working-with-objects/names#names",
    "priority": 0,
}
AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
_BUILTIN_EXTRA: dict[str, list[Obj]] = {
    "namespaces": [{"name": "Status", "type": "string", "jsonPath": ".status.phase"}],
    "pods": [{"name": "Status", "type": "string", "jsonPath": ".status.phase"}],
    "leases": [{"name": "Holder", "type": "string", "jsonPath": ".spec.holderIdentity"}],
}


def human_duration(seconds: float) -> str:
    """k8s.io/apimachinery/pkg/util/duration.HumanDuration."""
    s = int(seconds)
    if s < 0:
        return "<invalid>"
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = s // 3600
    if h < 8:
        return f"{h}h{m % 60}m" if m % 60 else f"{h}h"
    if h < 48:
        return f"{h}h"
    d = h // 24
    if d < 8:
        return f"{d}d{h % 24}h" if h % 24 else f"{d}d"
    if d < 365 * 2:
        return f"{d}d"
    if d < 365 * 8:
        return f"{d // 365}y{d % 365}d" if d % 365 else f"{d // 365}y"
    return f"{d // 365}y"


_SEG = re.compile(
    r"\.([A-Za-z0-9_\-/]+)|\[(\d+)\]|\[\?\(@\.([A-Za-z0-9_.]+)\s*==\s*['\"]([^'\"]*)['\"]\)\]|\[\*\]"
)


def jsonpath(obj: Any, path: str) -> Any:
    """The subset of JSONPath that printer columns use: fields, indexes, [*] and ==-filters."""
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    if path.startswith("$"):
        path = path[1:]
    if not path.startswith(".") and not path.startswith("["):
        path = "." + path
    values = [obj]
    for m in _SEG.finditer(path):
        nxt: list[Any] = []
        for v in values:
            if m.group(1) is not None and isinstance(v, dict) and m.group(1) in v:
                nxt.append(v[m.group(1)])
            elif m.group(2) is not None and isinstance(v, list) and int(m.group(2)) < len(v):
                nxt.append(v[int(m.group(2))])
            elif m.group(3) is not None and isinstance(v, list):
                for item in v:
                    if isinstance(item, dict) and str(jsonpath(item, "." + m.group(3))) == m.group(4):
                        nxt.append(item)
            elif m.group(0) == "[*]" and isinstance(v, list):
                nxt.extend(v)
        values = nxt
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def columns(rt: ResourceType) -> list[Obj]:
    if rt.custom:
        cols = rt.printer_columns or [AGE]
    else:
        cols = _BUILTIN_EXTRA.get(rt.plural, []) + [AGE]
    return cols


def _cell(col: Obj, obj: Obj, now: datetime) -> Any:
    v = jsonpath(obj, col.get("jsonPath", ""))
    if v is None:
        return None
    if col.get("type") == "date":
        try:
            t = datetime.fromisoformat(str(v).replace("Z", "+00:00"))
        except ValueError:
            return "<invalid>"
        return human_duration((now - t).total_seconds())
    if col.get("type") == "string" and not isinstance(v, str):
        return str(v) if not isinstance(v, (list, dict)) else v
    return v


def table(
    rt: ResourceType,
    objs: list[Obj],
    rv: str,
    with_columns: bool = True,
    cont: str | None = None,
    remaining: int | None = None,
    include_object: str = "Metadata",
) -> Obj:
    cols = columns(rt)
    now = datetime.now(UTC)
    rows = []
    for obj in objs:
        cells = [obj.get("metadata", {}).get("name")] + [_cell(c, obj, now) for c in cols]
        row: Obj = {"cells": cells}
        if include_object == "Object":
            row["object"] = obj
        elif include_object != "None":
            row["object"] = {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj.get("metadata", {}),
            }
        rows.append(row)
    meta: Obj = {"resourceVersion": rv}
    if cont:
        meta["continue"] = cont
    if remaining:
        meta["remainingItemCount"] = remaining
    out: Obj = {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": meta}
    if with_columns:
        defs = [NAME_COLUMN]
        for c in cols:
            desc = c.get("description") or (
                f"Custom resource definition column (in JSONPath format): {c.get('jsonPath', '')}"
            )
            defs.append(
                {
                    "name": c["name"],
                    "type": c.get("type", "string"),
                    "format": c.get("format", ""),
                    "description": desc,
                    "priority": c.get("priority", 0),
                }
            )
        out["columnDefinitions"] = defs
    else:
        out["columnDefinitions"] = None
    out["rows"] = rows
    return out
