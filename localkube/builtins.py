"""Kind-specific behaviour of built-in resources: namespaces, CRD status, Events in two API versions.

Built-ins are stored as sent (no schema), except for the few rules the project or kubectl relies on.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from loraplane.localkube import defaults
from loraplane.localkube.resources import ResourceType
from loraplane.localkube.status import ApiError

if TYPE_CHECKING:
    from loraplane.localkube.cluster import Cluster

Obj = dict[str, Any]
MICROTIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}(Z|[+-]\d\d:\d\d)$")
_RENAMES = (  # core/v1 Event field <-> events.k8s.io/v1 field
    ("involvedObject", "regarding"),
    ("message", "note"),
    ("source", "deprecatedSource"),
    ("firstTimestamp", "deprecatedFirstTimestamp"),
    ("lastTimestamp", "deprecatedLastTimestamp"),
    ("count", "deprecatedCount"),
    ("reportingComponent", "reportingController"),
)


_CORE_DEFAULTS = (
    ("source", {}),
    ("firstTimestamp", None),
    ("lastTimestamp", None),
    ("eventTime", None),
    ("reportingComponent", ""),
    ("reportingInstance", ""),
)
_NEW_DEFAULTS = (
    ("deprecatedSource", {}),
    ("deprecatedFirstTimestamp", None),
    ("deprecatedLastTimestamp", None),
)


def _is_new_events(rt: ResourceType) -> bool:
    return rt.group == "events.k8s.io"


def to_storage(rt: ResourceType, obj: Obj) -> Obj:
    """events.k8s.io/v1 objects are stored as core/v1 Events, so both APIs read the same object."""
    if not _is_new_events(rt):
        return obj
    out = dict(obj)
    out["apiVersion"], out["kind"] = "v1", "Event"
    for core, new in _RENAMES:
        if new in out:
            out[core] = out.pop(new)
    for k, v in _CORE_DEFAULTS:
        out.setdefault(k, v)
    return out


def from_storage(rt: ResourceType, obj: Obj) -> Obj:
    if not _is_new_events(rt):
        return obj
    out = dict(obj)
    out["apiVersion"], out["kind"] = "events.k8s.io/v1", "Event"
    for core, new in _RENAMES:
        if core in out:
            out[new] = out.pop(core)
    if not out.get("deprecatedCount"):
        out.pop("deprecatedCount", None)
    for k, v in _NEW_DEFAULTS:
        out.setdefault(k, v)
    return out


def field_alias(rt: ResourceType) -> dict[str, str] | None:
    """events.k8s.io field labels in terms of the stored core/v1 Event."""
    if not _is_new_events(rt):
        return None
    return {new: core for core, new in _RENAMES}


def _microtime(value: Any) -> Any:
    """MicroTime as kube-apiserver writes it back: UTC, six digits, Z."""
    if not isinstance(value, str):
        return value
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _time(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        t = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def normalize(rt: ResourceType, obj: Obj) -> Obj:
    """Defaults and time formats of typed built-ins, applied on every write."""
    obj = defaults.apply(rt, obj)
    if rt.plural == "events":
        for k, v in _NEW_DEFAULTS if _is_new_events(rt) else _CORE_DEFAULTS:
            obj.setdefault(k, v)
        for k in ("firstTimestamp", "lastTimestamp", "deprecatedFirstTimestamp", "deprecatedLastTimestamp"):
            if obj.get(k):
                obj[k] = _time(obj[k])
        if obj.get("eventTime"):
            obj["eventTime"] = _microtime(obj["eventTime"])
        if isinstance(obj.get("series"), dict) and obj["series"].get("lastObservedTime"):
            obj["series"] = {
                **obj["series"],
                "lastObservedTime": _microtime(obj["series"]["lastObservedTime"]),
            }
    elif rt.plural == "leases" and isinstance(obj.get("spec"), dict):
        spec = dict(obj["spec"])
        for k in ("acquireTime", "renewTime"):
            if spec.get(k):
                spec[k] = _microtime(spec[k])
        obj["spec"] = spec
    return obj


def on_create(cluster: Cluster, rt: ResourceType, obj: Obj) -> Obj:
    if rt.plural == "namespaces" and not rt.group:
        obj["spec"] = {"finalizers": ["kubernetes"]}
        obj["status"] = {"phase": "Active"}
        labels = dict(obj["metadata"].get("labels") or {})
        labels["kubernetes.io/metadata.name"] = obj["metadata"].get("name", "")
        obj["metadata"]["labels"] = labels
    elif rt.plural == "pods" and not rt.group:
        obj["status"] = {"phase": "Pending", "qosClass": "BestEffort"}  # never scheduled: no nodes here
    elif rt.plural == "customresourcedefinitions":
        spec = obj.setdefault("spec", {})
        names = spec.setdefault("names", {})
        names.setdefault("singular", str(names.get("kind", "")).lower())
        names.setdefault("listKind", str(names.get("kind", "")) + "List")
        spec.setdefault("conversion", {"strategy": "None"})
        # What the create answer shows; the CRD controller establishes it right after (establish()).
        obj["status"] = {
            "conditions": None,
            "acceptedNames": {"plural": "", "kind": ""},
            "storedVersions": [v["name"] for v in spec.get("versions") or [] if v.get("storage")],
        }
    return obj


def on_update(cluster: Cluster, rt: ResourceType, new: Obj, current: Obj) -> Obj:
    if rt.plural == "customresourcedefinitions":
        new["status"] = current.get("status", {})
        if (current.get("status") or {}).get("conditions"):
            new["status"] = {**new["status"], "acceptedNames": crd_status(new)["acceptedNames"]}
    elif rt.plural == "namespaces" and not rt.group:
        new["spec"] = current.get("spec", {})
        new["status"] = current.get("status", {})
    return new


def crd_status(crd: Obj) -> Obj:
    """Names accepted and Established at once: kube-apiserver gets there within milliseconds."""
    from loraplane.localkube.cluster import now

    names = dict((crd.get("spec") or {}).get("names") or {})
    names.setdefault("singular", names.get("kind", "").lower())
    names.setdefault("listKind", names.get("kind", "") + "List")
    t = now()
    return {
        "conditions": [
            {
                "type": "NamesAccepted",
                "status": "True",
                "lastTransitionTime": t,
                "reason": "NoConflicts",
                "message": "no conflicts found",
            },
            {
                "type": "Established",
                "status": "True",
                "lastTransitionTime": t,
                "reason": "InitialNamesAccepted",
                "message": "the initial names have been accepted",
            },
        ],
        "acceptedNames": names,
        "storedVersions": [
            v["name"] for v in (crd.get("spec") or {}).get("versions") or [] if v.get("storage")
        ],
    }


def _check_microtime(rt: ResourceType, value: Any) -> None:
    if isinstance(value, str) and not MICROTIME.match(value):
        raise ApiError(
            400,
            f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: parsing time "{value}" as '
            f'"2006-01-02T15:04:05.000000Z07:00": cannot parse "{value[19:]}" as ".000000"',
        )


APPROVAL = "api-approved.kubernetes.io"
_APPROVAL_DOC = "see https://github.com/kubernetes/enhancements/pull/1111"


def _approval_state(crd: Obj) -> tuple[str, str]:
    """apiextensions' GetAPIApprovalState: (state, reason) of a CRD's approval annotation."""
    value = str(((crd.get("metadata") or {}).get("annotations") or {}).get(APPROVAL, ""))
    if not value:
        return "Missing", f'protected groups must have approval annotation "{APPROVAL}", {_APPROVAL_DOC}'
    if value.startswith("unapproved"):
        return "Bypassed", f"not approved: {value!r}"
    url = urlsplit(value)
    if url.scheme and url.netloc and " " not in value:
        return "Approved", f"approved in {value}"
    return "Invalid", (
        f'protected groups must have approval annotation "{APPROVAL}" with either a URL or a reason '
        f'starting with "unapproved", {_APPROVAL_DOC}'
    )


def crd_approval(crd: Obj, old: Obj | None) -> list[dict[str, str]]:
    """kube-apiserver refuses a CRD in a protected group (k8s.io, kubernetes.io and their subdomains)
    without the approval annotation; an update that leaves the approval state as it was passes."""
    group = str((crd.get("spec") or {}).get("group", ""))
    if not any(group == g or group.endswith("." + g) for g in ("k8s.io", "kubernetes.io")):
        return []
    state, reason = _approval_state(crd)
    if (old is not None and _approval_state(old)[0] == state) or state in ("Approved", "Bypassed"):
        return []
    field = f"metadata.annotations[{APPROVAL}]"
    if state == "Missing":
        return [{"reason": "FieldValueRequired", "message": f"Required value: {reason}", "field": field}]
    value = crd["metadata"]["annotations"][APPROVAL]
    return [{"reason": "FieldValueInvalid", "message": f'Invalid value: "{value}": {reason}', "field": field}]


def validate(rt: ResourceType, obj: Obj, causes: list[dict[str, str]]) -> None:
    """The built-in rules the recordings show and the project relies on."""
    if rt.plural == "events":
        ns = obj["metadata"].get("namespace", "")
        _check_microtime(rt, obj.get("eventTime"))
        ref = obj.get("regarding" if _is_new_events(rt) else "involvedObject") or {}
        if ref.get("namespace") and ns and ref["namespace"] != ns:
            field = "regarding.namespace" if _is_new_events(rt) else "involvedObject.namespace"
            causes.append(
                {
                    "reason": "FieldValueInvalid",
                    "field": field,
                    "message": f'Invalid value: "{ref["namespace"]}": does not match event.namespace',
                }
            )
        if _is_new_events(rt) and not obj.get("eventTime"):
            causes.append({"reason": "FieldValueRequired", "message": "Required value", "field": "eventTime"})
        typ = obj.get("type")
        if typ and typ not in ("Normal", "Warning"):
            causes.append(
                {
                    "reason": "FieldValueInvalid",
                    "field": "type",
                    "message": f'Invalid value: "": has invalid value: {typ}',
                }
            )
    elif rt.plural == "leases":
        spec = obj.get("spec") or {}
        for k in ("acquireTime", "renewTime"):
            _check_microtime(rt, spec.get(k))
