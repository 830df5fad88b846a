"""meta/v1 Status bodies and the exception that carries one out of a handler."""

from __future__ import annotations

from typing import Any

from loraplane.localkube.resources import ResourceType

REASONS = {
    400: "BadRequest",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    422: "Invalid",
    500: "InternalError",
    504: "Timeout",
}


class ApiError(Exception):
    """An error response: HTTP code plus the Status body kube-apiserver would send."""

    def __init__(
        self,
        code: int,
        message: str,
        reason: str | None = "",
        details: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = REASONS.get(code) if reason == "" else reason
        self.details = details
        self.headers = headers or {}
        self.warnings: list[str] = []

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure"}
        out["message"] = self.message
        if self.reason:
            out["reason"] = self.reason
        if self.details is not None:
            out["details"] = self.details
        out["code"] = self.code
        return out


def _details(rt: ResourceType, name: str, kind: str | None = None) -> dict[str, Any]:
    d: dict[str, Any] = {}
    if name:
        d["name"] = name
    if rt.group:
        d["group"] = rt.group
    d["kind"] = kind or rt.plural
    return d


def not_found(rt: ResourceType, name: str) -> ApiError:
    return ApiError(404, f'{rt.qualified} "{name}" not found', details=_details(rt, name))


def already_exists(rt: ResourceType, name: str) -> ApiError:
    return ApiError(409, f'{rt.qualified} "{name}" already exists', "AlreadyExists", _details(rt, name))


def conflict(rt: ResourceType, name: str) -> ApiError:
    msg = (
        f'Operation cannot be fulfilled on {rt.qualified} "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    return ApiError(409, msg, "Conflict", _details(rt, name))


def precondition_failed(rt: ResourceType, name: str, what: str, want: str, have: str) -> ApiError:
    if what == "UID":
        tail = (
            f"the UID in the precondition ({want}) does not match the UID in record ({have}). "
            "The object might have been deleted and then recreated"
        )
    else:
        tail = (
            f"the ResourceVersion in the precondition ({want}) does not match the ResourceVersion in "
            f"record ({have}). The object might have been modified"
        )
    msg = f'Operation cannot be fulfilled on {rt.kind_qualified} "{name}": {tail}'
    return ApiError(409, msg, "Conflict", _details(rt, name, rt.kind))


def invalid(rt: ResourceType, name: str, causes: list[dict[str, str]], kind: str | None = None) -> ApiError:
    """422 Invalid in kube-apiserver's shape: `Kind.group "name" is invalid: field: message[, ...]`."""
    parts = [f"{c.get('field', '<nil>')}: {c['message']}" for c in causes]
    joined = parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
    k = kind or rt.kind
    # events.k8s.io Events are validated as core Events: no group in the message or details.
    group = "" if rt.group == "events.k8s.io" else rt.group
    prefix = f"{k}.{group}" if group else k
    details = _details(rt, name, k)
    if not group:
        details.pop("group", None)
    details["causes"] = causes
    return ApiError(422, f'{prefix} "{name}" is invalid: {joined}', "Invalid", details)


def options_invalid(kind: str, causes: list[dict[str, str]]) -> ApiError:
    parts = [f"{c['field']}: {c['message']}" for c in causes]
    joined = parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
    details = {"group": "meta.k8s.io", "kind": kind, "causes": causes}
    return ApiError(422, f'{kind}.meta.k8s.io "" is invalid: {joined}', "Invalid", details)


def success(rt: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata", {})
    details = _details(rt, meta.get("name", ""))
    details["uid"] = meta.get("uid", "")
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}
