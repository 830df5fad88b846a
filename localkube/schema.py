"""Structural OpenAPI v3 admission of custom resources: pruning, defaults, validation and CEL rules.

Driven only by the CRD's openAPIV3Schema. Messages, reasons and field paths are kube-apiserver's, so a
client sees the same 422 it would see on a real cluster. CEL rules run only when the object passed the
checks that make them unsafe to evaluate (types, enums, maxLength, required), as upstream does.
"""

from __future__ import annotations

import copy
import json
import re
from datetime import datetime
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from loraplane.localkube.status import ApiError

if TYPE_CHECKING:
    from loraplane.localkube.resources import ResourceType

Obj = dict[str, Any]
Cause = dict[str, str]
FATAL = {
    "FieldValueTypeInvalid",
    "FieldValueNotSupported",
    "FieldValueTooLong",
    "FieldValueRequired",
    "FieldValueTooMany",
}
TOP_KNOWN = ("apiVersion", "kind", "metadata")


def has_rules(node: Any) -> bool:
    if isinstance(node, dict):
        if node.get("x-kubernetes-validations"):
            return True
        return any(has_rules(v) for v in node.values())
    if isinstance(node, list):
        return any(has_rules(v) for v in node)
    return False


def _child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# -- pruning ---------------------------------------------------------------------------------------
def _prune(schema: Obj, value: Any, path: str, unknown: list[str]) -> Any:
    if isinstance(value, dict) and (schema.get("type") == "object" or "properties" in schema):
        props = schema.get("properties")
        addl = schema.get("additionalProperties")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields")
        if props is None and isinstance(addl, dict):
            return {k: _prune(addl, v, f"{path}[{k}]" if path else k, unknown) for k, v in value.items()}
        out = {}
        for k, v in value.items():
            if not path and k in TOP_KNOWN:
                out[k] = v  # type meta and metadata are never pruned by the CRD's schema
            elif props is not None and k in props:
                out[k] = _prune(props[k], v, _child(path, k), unknown)
            elif preserve or addl is True:
                out[k] = v
            else:
                unknown.append(_child(path, k))
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_prune(schema["items"], v, f"{path}[{i}]", unknown) for i, v in enumerate(value)]
    return value


def unknown_fields(schema: Obj, obj: Obj) -> list[str]:
    unknown: list[str] = []
    _prune(schema, obj, "", unknown)
    return unknown


def strict_patch_error(obj: Obj, unknown: list[str]) -> ApiError:
    """A merge patch with unknown fields under Strict: upstream's 422 that embeds the patched object."""
    text = json.dumps(obj, separators=(",", ":"), sort_keys=True)
    msg = ", ".join(f'unknown field "{u}"' for u in unknown)
    cause = {
        "reason": "FieldValueInvalid",
        "field": "patch",
        "message": f"Invalid value: {json.dumps(text)}: strict decoding error: {msg}",
    }
    return ApiError(422, f' "" is invalid: patch: {cause["message"]}', "Invalid", {"causes": [cause]})


# -- defaults --------------------------------------------------------------------------------------
def _defaults(schema: Obj, value: Any) -> Any:
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for k, sub in props.items():
            if k not in value and "default" in sub:
                value[k] = copy.deepcopy(sub["default"])
            if k in value:
                value[k] = _defaults(sub, value[k])
        addl = schema.get("additionalProperties")
        if isinstance(addl, dict) and not props:
            for k in value:
                value[k] = _defaults(addl, value[k])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_defaults(schema["items"], v) for v in value]
    return value


# -- validation ------------------------------------------------------------------------------------
def _type_name(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "integer" if v.is_integer() else "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    return "object"


def _go(v: Any) -> str:
    """A value as Go's field.Invalid prints it."""
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return json.dumps(v, separators=(",", ":"))


class _Validator:
    def __init__(self, status_rel: bool) -> None:
        self.causes: list[Cause] = []
        self.required: list[Cause] = []
        self.status_rel = status_rel

    def _name(self, path: str) -> str:
        # Under the status subresource upstream names the field relative to status in messages.
        if self.status_rel and path.startswith("status."):
            return path[len("status.") :]
        return path

    def add(self, reason: str, field: str, message: str) -> None:
        (self.required if reason == "FieldValueRequired" else self.causes).append(
            {"reason": reason, "message": message, "field": field}
        )

    def check(self, s: Obj, v: Any, path: str, old: Any = None, has_old: bool = False) -> None:
        if has_old and v == old:
            return  # ratcheting (CRDValidationRatcheting): an unchanged value is not re-validated
        if v is None:
            if not s.get("nullable"):
                self.add(
                    "FieldValueTypeInvalid",
                    path,
                    f'Invalid value: "null": {self._name(path)} in body must be of type {s.get("type", "object")}: "null"',
                )
            return
        t = s.get("type")
        actual = _type_name(v)
        if t and not s.get("x-kubernetes-int-or-string"):
            ok = actual == t or (t == "number" and actual == "integer")
            if not ok:
                self.add(
                    "FieldValueTypeInvalid",
                    path,
                    f'Invalid value: "{actual}": {self._name(path)} in body must be of type {t}: "{actual}"',
                )
                if t == "integer" and actual == "number":
                    msg = f"integer (default format) in {self._name(path)}"
                    self.add(
                        "FieldValueInvalid",
                        "<nil>",
                        f'Invalid value: "": Checked value must be of type {msg}',
                    )
                return
        elif s.get("x-kubernetes-int-or-string") and actual not in ("integer", "string"):
            self.add(
                "FieldValueTypeInvalid",
                path,
                f'Invalid value: "{actual}": {self._name(path)} in body must be of type integer,string: "{actual}"',
            )
            return
        if "enum" in s and v not in s["enum"]:
            allowed = ", ".join(_go(e) for e in s["enum"])
            self.add(
                "FieldValueNotSupported", path, f"Unsupported value: {_go(v)}: supported values: {allowed}"
            )
        if isinstance(v, str):
            self._string(s, v, path)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            self._number(s, v, path)
        elif isinstance(v, list):
            self._array(s, v, path)
        elif isinstance(v, dict):
            self._object(s, v, path, old if has_old and isinstance(old, dict) else None)

    def _string(self, s: Obj, v: str, path: str) -> None:
        n = self._name(path)
        # One error of maxLength, minLength, pattern (in that order), as kube-openapi's string validator
        # returns at the first; the format is a validator of its own.
        if "maxLength" in s and len(v) > s["maxLength"]:
            self.add("FieldValueTooLong", path, f"Too long: may not be more than {s['maxLength']} bytes")
        elif "minLength" in s and len(v) < s["minLength"]:
            self.add(
                "FieldValueInvalid",
                path,
                f"Invalid value: {_go(v)}: {n} in body should be at least {s['minLength']} chars long",
            )
        elif "pattern" in s and not _regex(s["pattern"]).search(v):
            self.add(
                "FieldValueInvalid",
                path,
                f"Invalid value: {_go(v)}: {n} in body should match '{s['pattern']}'",
            )
        fmt = s.get("format")
        if fmt == "date-time" and not _is_datetime(v):
            self.add(
                "FieldValueTypeInvalid",
                path,
                f"Invalid value: {_go(v)}: {n} in body must be of type date-time: {_go(v)}",
            )

    def _number(self, s: Obj, v: float, path: str) -> None:
        n = self._name(path)
        if "minimum" in s:
            if s.get("exclusiveMinimum") and v <= s["minimum"]:
                self.add(
                    "FieldValueInvalid",
                    path,
                    f"Invalid value: {_go(v)}: {n} in body should be greater than {_go(s['minimum'])}",
                )
            elif v < s["minimum"]:
                self.add(
                    "FieldValueInvalid",
                    path,
                    f"Invalid value: {_go(v)}: {n} in body should be greater than or equal to {_go(s['minimum'])}",
                )
        if "maximum" in s:
            if s.get("exclusiveMaximum") and v >= s["maximum"]:
                self.add(
                    "FieldValueInvalid",
                    path,
                    f"Invalid value: {_go(v)}: {n} in body should be less than {_go(s['maximum'])}",
                )
            elif v > s["maximum"]:
                self.add(
                    "FieldValueInvalid",
                    path,
                    f"Invalid value: {_go(v)}: {n} in body should be less than or equal to {_go(s['maximum'])}",
                )
        if "multipleOf" in s and s["multipleOf"] and v % s["multipleOf"]:
            self.add(
                "FieldValueInvalid",
                path,
                f"Invalid value: {_go(v)}: {n} in body should be a multiple of {_go(s['multipleOf'])}",
            )

    def _array(self, s: Obj, v: list[Any], path: str) -> None:
        if "maxItems" in s and len(v) > s["maxItems"]:
            self.add(
                "FieldValueTooMany", path, f"Too many: {len(v)}: must have at most {s['maxItems']} items"
            )
        if "minItems" in s and len(v) < s["minItems"]:
            self.add(
                "FieldValueInvalid",
                path,
                f"Invalid value: {len(v)}: {self._name(path)} in body should have at least {s['minItems']} items",
            )
        items = s.get("items")
        if isinstance(items, dict):
            for i, item in enumerate(v):
                self.check(items, item, f"{path}[{i}]")
        kind = s.get("x-kubernetes-list-type")
        if kind in ("map", "set"):
            keys = s.get("x-kubernetes-list-map-keys") or []
            seen: set[str] = set()
            for i, item in enumerate(v):
                key = {k: item.get(k) for k in keys} if kind == "map" and isinstance(item, dict) else item
                text = json.dumps(key, separators=(",", ":"), sort_keys=True)
                if text in seen:
                    self.add("FieldValueDuplicate", f"{path}[{i}]", f"Duplicate value: {text}")
                seen.add(text)

    def _object(self, s: Obj, v: Obj, path: str, old: Obj | None = None) -> None:
        props = s.get("properties") or {}
        for k, item in v.items():
            if not path and k in TOP_KNOWN:
                continue
            if k in props:
                self.check(
                    props[k], item, _child(path, k), old.get(k) if old else None, bool(old) and k in old
                )
            elif isinstance(s.get("additionalProperties"), dict):
                self.check(s["additionalProperties"], item, f"{path}[{k}]" if path else k)
        for r in s.get("required") or []:
            if r not in v:
                self.add("FieldValueRequired", _child(path, r), "Required value")
        if "maxProperties" in s and len(v) > s["maxProperties"]:
            self.add(
                "FieldValueTooMany", path, f"Too many: {len(v)}: must have at most {s['maxProperties']} items"
            )


@lru_cache(maxsize=512)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _is_datetime(v: str) -> bool:
    try:
        datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        return False
    return "T" in v or " " in v


def admit(
    rt: ResourceType, obj: Obj, old: Obj | None, validation: str
) -> tuple[Obj, list[str], list[Cause], bool]:
    """Prune, default and validate `obj`; returns (object, warnings, causes, CEL-suppressing error seen)."""
    from loraplane.localkube import cel

    schema = rt.schema or {}
    unknown: list[str] = []
    pruned = _prune(schema, obj, "", unknown)
    warnings: list[str] = []
    if unknown and validation == "Strict":
        msg = ", ".join(f'unknown field "{u}"' for u in unknown)
        raise ApiError(
            400,
            f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: '
            f"strict decoding error: {msg}",
        )
    if unknown and validation != "Ignore":
        warnings = [f'unknown field "{u}"' for u in unknown]
    pruned = _defaults(schema, pruned)
    v = _Validator(status_rel=rt.status_subresource)
    v.check(schema, pruned, "", old, old is not None)
    causes = v.causes + v.required
    fatal = any(c["reason"] in FATAL for c in causes)
    if not fatal:
        causes.extend(cel.check(schema, pruned, old, ""))
    return pruned, warnings, causes, fatal
