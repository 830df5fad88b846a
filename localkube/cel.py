"""x-kubernetes-validations: CEL rules with `self` and `oldSelf`.

Rules are compiled once per rule text with common-expression-language (a compiled engine, ~10 us per
evaluation); rules it cannot compile fall back to cel-python. A rule that mentions oldSelf is a
transition rule and runs only on updates where the old object has a value at the same place. As with
kube-apiserver's validation ratcheting, rules are not re-evaluated on a value the update left unchanged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from typing import Any

import cel as rust_cel
import celpy
from celpy import celtypes

Obj = dict[str, Any]
Cause = dict[str, str]


Program = Callable[[dict[str, Any]], Any]


@lru_cache(maxsize=1024)
def _program(rule: str) -> Program:
    """A callable taking the activation (plain JSON values); raises ValueError if nothing compiles it."""
    try:
        compiled = rust_cel.compile(rule)
        return compiled.execute
    except Exception:
        pass
    env = celpy.Environment()
    prog = env.program(env.compile(rule))

    def run(act: dict[str, Any]) -> Any:
        out = prog.evaluate({k: celpy.json_to_cel(v) for k, v in act.items()})
        if isinstance(out, Exception):
            raise out
        return bool(out) if isinstance(out, celtypes.BoolType) else out

    return run


def compiles(rule: str) -> bool:
    try:
        _program(rule)
    except Exception:
        return False
    return True


def _evaluate(rule: str, value: Any, old: Any, has_old: bool) -> tuple[bool | None, str]:
    act: dict[str, Any] = {"self": value}
    if has_old:
        act["oldSelf"] = old
    try:
        result = _program(rule)(act)
    except KeyError as e:
        return None, f"no such key: {e.args[0] if e.args else ''}"
    except Exception as e:
        return None, str(e)
    return bool(result), ""


def _message(rule: Obj, value: Any) -> str:
    expr = rule.get("messageExpression")
    if expr:
        try:
            out = _program(expr)({"self": value})
            if isinstance(out, str):
                return str(out)
        except Exception:
            pass
    if rule.get("message"):
        return str(rule["message"])
    return f"failed rule: {rule['rule']}"


def _shown(value: Any) -> str:
    """The value as kube-apiserver's field.Invalid shows it before the message: a scalar in Go syntax
    (`"s3:/bucket/a": `, `5: `), nothing for an object or a list."""
    if isinstance(value, dict | list):
        return ""
    if isinstance(value, str):
        return json.dumps(value) + ": "
    if isinstance(value, float) and value.is_integer():
        return f"{int(value)}: "
    return json.dumps(value) + ": "


def check(schema: Obj, value: Any, old: Any, path: str, has_old: bool = True) -> list[Cause]:
    """Evaluate every rule in the schema tree against `value` (and `old` for transition rules)."""
    causes: list[Cause] = []
    if value is None:
        return causes
    has_old = has_old and old is not None
    if has_old and value == old:
        return causes  # ratcheting: an unchanged value is not re-validated
    for rule in schema.get("x-kubernetes-validations") or []:
        text = rule.get("rule", "")
        transition = "oldSelf" in text
        if transition and not has_old:
            continue
        if not compiles(text):
            # A rule kube-apiserver accepts but cel-python cannot compile is skipped, not failed.
            continue
        ok, err = _evaluate(text, value, old, transition)
        if ok:
            continue
        field = path + (rule.get("fieldPath") or "")
        field = field.lstrip(".") if field.startswith(".") else field
        reason = {
            "FieldValueForbidden": "FieldValueForbidden",
            "FieldValueRequired": "FieldValueRequired",
            "FieldValueDuplicate": "FieldValueDuplicate",
        }.get(rule.get("reason", ""), "FieldValueInvalid")
        if ok is None:
            msg = f'Invalid value: "object": {err}'
        elif reason == "FieldValueForbidden":
            msg = f"Forbidden: {_message(rule, value)}"
        elif reason == "FieldValueRequired":
            msg = f"Required value: {_message(rule, value)}"
        elif reason == "FieldValueDuplicate":
            msg = (
                f"Duplicate value: {json.dumps(value, separators=(',', ':'))}"  # field.Duplicate: no message
            )
        else:
            msg = f"Invalid value: {_shown(value)}{_message(rule, value)}"
        causes.append({"reason": reason, "message": msg, "field": field or "<nil>"})
    props = schema.get("properties") or {}
    if isinstance(value, dict):
        for k, sub in props.items():
            if k in value:
                sub_old = old.get(k) if isinstance(old, dict) else None
                child = f"{path}.{k}" if path else k
                if not path and k in ("apiVersion", "kind", "metadata"):
                    continue
                causes.extend(check(sub, value[k], sub_old, child, has_old and sub_old is not None))
        addl = schema.get("additionalProperties")
        if isinstance(addl, dict) and not props:
            for k, item in value.items():
                sub_old = old.get(k) if isinstance(old, dict) else None
                causes.extend(check(addl, item, sub_old, f"{path}[{k}]", has_old and sub_old is not None))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            # Upstream correlates list items by key (map lists) only; index correlation is not done.
            causes.extend(check(schema["items"], item, None, f"{path}[{i}]", False))
    return causes
