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
AGE_DESCRIPTION = (
    "CreationTimestamp is a timestamp representing the server time when this object was created. It is not "
    "guaranteed to be set in happens-before order across separate operations. Clients may not set this value. "
    "It is represented in RFC3339 form and is in UTC.\n\nPopulated by the system. Read-only. Null for lists. "
    "More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata"
)


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


def _since(value: Any, now: datetime) -> str:
    if not value:
        return "<unknown>"
    try:
        t = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return "<invalid>"
    return human_duration((now - t).total_seconds())


def _event_cells(obj: Obj, now: datetime) -> list[Any]:
    ref = obj.get("involvedObject") or {}
    src = obj.get("source") or {}
    component = src.get("component") or obj.get("reportingComponent") or ""
    instance = src.get("host") or obj.get("reportingInstance") or ""
    source = component + (", " + instance if instance else "")
    last = (
        obj.get("lastTimestamp") or (obj.get("series") or {}).get("lastObservedTime") or obj.get("eventTime")
    )
    count = (obj.get("series") or {}).get("count") or obj.get("count") or 1
    return [
        _since(last, now),
        obj.get("type", ""),
        obj.get("reason", ""),
        f"{str(ref.get('kind', '')).lower()}/{ref.get('name', '')}",
        ref.get("fieldPath", ""),
        source,
        obj.get("message", ""),
        _since(obj.get("firstTimestamp") or obj.get("eventTime"), now),
        count,
        obj.get("metadata", {}).get("name"),
    ]


def _col(name: str, description: str, priority: int = 0, fmt: str = "") -> Obj:
    return {"name": name, "type": "string", "format": fmt, "description": description, "priority": priority}


EVENT_COLUMNS = [
    _col("Last Seen", "The time at which the most recent occurrence of this event was recorded."),
    _col("Type", "Type of this event (Normal, Warning), new types could be added in the future"),
    _col(
        "Reason",
        "This should be a short, machine understandable string that gives the reason for the "
        "transition into the object's current status.",
    ),
    _col("Object", "The object that this event is about."),
    _col(
        "Subobject",
        "If referring to a piece of an object instead of an entire object, this string should "
        "contain a valid JSON/Go field access statement, such as desiredState.manifest.containers[2]. For example, "
        "if the object reference is to a container within a pod, this would take on a value like: "
        '"spec.containers{name}" (where "name" refers to the name of the container that triggered the event) or if '
        'no container name is specified "spec.containers[2]" (container with index 2 in this pod). This syntax is '
        "chosen only to have some well-defined way of referencing a part of an object.",
        1,
    ),
    _col("Source", "The component reporting this event. Should be a short machine understandable string.", 1),
    _col("Message", "A human-readable description of the status of this operation."),
    _col(
        "First Seen",
        "The time at which the event was first recorded. (Time of server receipt is in TypeMeta.)",
        1,
    ),
    _col("Count", "The number of times this event has occurred.", 1),
    {**NAME_COLUMN, "priority": 1},
]


def _builtin(rt: ResourceType) -> tuple[list[Obj], Any]:
    """Column definitions and a cell function for built-in kinds (Name, extras, Age as kubectl shows them)."""
    age = _col("Age", AGE_DESCRIPTION)
    if rt.plural == "events" and not rt.group:
        return EVENT_COLUMNS, _event_cells
    extra: list[tuple[Obj, str]] = []
    if rt.plural == "namespaces":
        extra = [(_col("Status", "The status of the namespace"), ".status.phase")]
    elif rt.plural == "pods":
        extra = [(_col("Status", "The aggregate status of the containers in this pod."), ".status.phase")]
    elif rt.plural == "leases":
        extra = [
            (
                _col("Holder", "HolderIdentity contains the identity of the holder of a current lease."),
                ".spec.holderIdentity",
            )
        ]

    def cells(obj: Obj, now: datetime) -> list[Any]:
        out = [obj.get("metadata", {}).get("name")]
        out += [jsonpath(obj, path) or "" for _, path in extra]
        return out + [_since(obj.get("metadata", {}).get("creationTimestamp"), now)]

    return [NAME_COLUMN] + [c for c, _ in extra] + [age], cells


def _custom(rt: ResourceType) -> tuple[list[Obj], Any]:
    cols = rt.printer_columns or [AGE]
    defs = [NAME_COLUMN]
    for c in cols:
        desc = (
            c.get("description")
            or f"Custom resource definition column (in JSONPath format): {c.get('jsonPath', '')}"
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

    def cells(obj: Obj, now: datetime) -> list[Any]:
        return [obj.get("metadata", {}).get("name")] + [_cell(c, obj, now) for c in cols]

    return defs, cells


def _cell(col: Obj, obj: Obj, now: datetime) -> Any:
    v = jsonpath(obj, col.get("jsonPath", ""))
    if v is None:
        return None
    if col.get("type") == "date":
        return _since(v, now)
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
    defs, cell_fn = _custom(rt) if rt.custom else _builtin(rt)
    now = datetime.now(UTC)
    rows = []
    for obj in objs:
        row: Obj = {"cells": cell_fn(obj, now)}
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
    out["columnDefinitions"] = defs if with_columns else None
    out["rows"] = rows
    return out
