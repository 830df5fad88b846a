"""Admission of a write: type meta, metadata rules, the CRD schema (schema.py) and built-in checks.

Answers are kube-apiserver's 400/422 Status bodies with its messages and field paths.
"""

from __future__ import annotations

import re
from typing import Any

from loraplane.localkube import builtins, schema, status
from loraplane.localkube.resources import ResourceType
from loraplane.localkube.status import ApiError

Obj = dict[str, Any]
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and "
    "must start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start "
    "and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
NOT_CHECKED = {
    "reason": "FieldValueInvalid",
    "message": "Invalid value: null: some validation rules were not checked because the object was invalid; "
    "correct the existing errors to complete validation",
    "field": "<nil>",
}


def check_type_meta(rt: ResourceType, body: Obj, name: str) -> None:
    av, kind = body.get("apiVersion"), body.get("kind")
    if av and av != rt.api_version:
        err = ApiError(
            400,
            f"the API version in the data ({av}) does not match the expected API version ({rt.api_version})",
        )
        # Decoded against a version without a schema, every field but the type meta is unknown.
        err.warnings = [f'unknown field "{k}"' for k in body if k not in ("apiVersion", "kind", "metadata")]
        raise err
    if kind and kind != rt.kind:
        cause = {
            "reason": "FieldValueInvalid",
            "message": f'Invalid value: "{kind}": must be {rt.kind}',
            "field": "kind",
        }
        raise status.invalid(rt, name, [cause], kind=kind)


def admit(rt: ResourceType, obj: Obj, old: Obj | None, validation: str) -> tuple[Obj, list[str]]:
    """Metadata checks, schema defaults/pruning/validation and kind-specific rules."""
    meta = obj.get("metadata") or {}
    name = meta.get("name", "")
    causes: list[dict[str, str]] = []
    fatal = False
    if not name:
        causes.append(
            {
                "reason": "FieldValueRequired",
                "message": "Required value: name or generateName is required",
                "field": "metadata.name",
            }
        )
        fatal = True
    else:
        rx, msg = (
            (DNS1123_LABEL, LABEL_MSG) if rt.plural == "namespaces" else (DNS1123_SUBDOMAIN, SUBDOMAIN_MSG)
        )
        # Like apimachinery's IsDNS1123Subdomain/Label: the length and the pattern are separate errors.
        limit = 63 if rt.plural == "namespaces" else 253
        problems = [f"must be no more than {limit} characters"] if len(name) > limit else []
        if not rx.match(name):
            problems.append(msg)
        if problems:
            causes.append(
                {
                    "reason": "FieldValueInvalid",
                    "message": f'Invalid value: "{name}": {", ".join(problems)}',
                    "field": "metadata.name",
                }
            )
    ann = meta.get("annotations") or {}
    if sum(len(k) + len(str(v)) for k, v in ann.items()) > 262144:
        causes.append(
            {
                "reason": "FieldValueTooLong",
                "message": "Too long: may not be more than 262144 bytes",
                "field": "metadata.annotations",
            }
        )
        fatal = True
    if old is not None and (old.get("metadata") or {}).get("deletionTimestamp"):
        added = [
            f for f in meta.get("finalizers") or [] if f not in (old["metadata"].get("finalizers") or [])
        ]
        if added:
            quoted = ", ".join(f'"{f}"' for f in added)
            cause = {
                "reason": "FieldValueForbidden",
                "field": "metadata.finalizers",
                "message": "Forbidden: no new finalizers can be added if the object is being "
                f"deleted, found new finalizers []string{{{quoted}}}",
            }
            causes.extend([cause, dict(cause)])  # kube-apiserver reports it twice (two validators)
    warnings: list[str] = []
    if rt.custom and rt.schema is not None:
        obj, warnings, scauses, sfatal = schema.admit(rt, obj, old, validation)
        causes.extend(scauses)
        fatal = fatal or sfatal
    elif not rt.custom:
        builtins.validate(rt, obj, causes)
        if rt.plural == "customresourcedefinitions":
            causes.extend(builtins.crd_approval(obj, old))
        obj = builtins.normalize(rt, obj)
    if causes:
        if fatal and rt.custom and rt.schema is not None and schema.has_rules(rt.schema):
            causes.append(dict(NOT_CHECKED))
        raise status.invalid(rt, name, causes)
    return obj, warnings
