"""Label and field selectors, parsed the way kube-apiserver parses them, with its error messages."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

Obj = dict[str, Any]
Pred = Callable[[Obj], bool]


class SelectorError(ValueError):
    """A selector that cannot be parsed: the handler turns it into 400 BadRequest."""


_TOKEN = re.compile(r"\s*(!=|==|=|!|\(|\)|,|[^\s!=(),]+)")


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            break
        if m.group(1):
            out.append(m.group(1))
        pos = m.end()
        if not text[pos:].strip():
            break
    return out


def parse_labels(text: str) -> Pred:
    """Parse `a=b,c!=d,e in (x,y),f notin (z),g,!h` into a predicate over an object's labels."""
    toks = _tokens(text or "")
    reqs: list[Callable[[dict[str, str]], bool]] = []
    i = 0

    def expect_values(j: int) -> tuple[list[str], int]:
        if j >= len(toks) or toks[j] != "(":
            found = toks[j] if j < len(toks) else ""
            raise SelectorError(f"unable to parse requirement: found '{found}' expected: '('")
        vals: list[str] = []
        j += 1
        while j < len(toks) and toks[j] != ")":
            if toks[j] != ",":
                vals.append(toks[j])
            j += 1
        if j >= len(toks):
            raise SelectorError("unable to parse requirement: found '', expected: ')'")
        return vals, j + 1

    while i < len(toks):
        t = toks[i]
        if t == ",":
            i += 1
            continue
        if t == "!":
            if i + 1 >= len(toks):
                raise SelectorError("unable to parse requirement: found '', expected: identifier")
            key = toks[i + 1]
            reqs.append(lambda lb, k=key: k not in lb)
            i += 2
            continue
        key = t
        op = toks[i + 1] if i + 1 < len(toks) else ","
        if op in ("=", "=="):
            val = toks[i + 2] if i + 2 < len(toks) and toks[i + 2] != "," else ""
            reqs.append(lambda lb, k=key, v=val: lb.get(k) == v)
            i += 3 if val else 2
        elif op == "!=":
            val = toks[i + 2] if i + 2 < len(toks) and toks[i + 2] != "," else ""
            reqs.append(lambda lb, k=key, v=val: lb.get(k) != v)
            i += 3 if val else 2
        elif op == "in":
            vals, i = expect_values(i + 2)
            reqs.append(lambda lb, k=key, vs=frozenset(vals): lb.get(k) in vs)
        elif op == "notin":
            vals, i = expect_values(i + 2)
            reqs.append(lambda lb, k=key, vs=frozenset(vals): lb.get(k) not in vs)
        elif op == ",":
            reqs.append(lambda lb, k=key: k in lb)
            i += 1
        else:
            raise SelectorError(f"unable to parse requirement: found '{op}', expected: ',' or operator")
    if not reqs:
        return lambda obj: True
    return lambda obj: all(r((obj.get("metadata") or {}).get("labels") or {}) for r in reqs)


def _field_value(obj: Obj, path: str) -> str:
    cur: Any = obj
    for part in path.split("."):
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(part)
    if path == "source" and isinstance(cur, dict):
        cur = cur.get("component")
    if cur is None:
        return ""
    return cur if isinstance(cur, str) else str(cur)


def parse_fields(text: str, supported: tuple[str, ...], alias: dict[str, str] | None = None) -> Pred:
    """Parse `metadata.name=x,involvedObject.kind!=y`; labels outside `supported` are a 400."""
    reqs: list[Pred] = []
    allowed = {"metadata.name", "metadata.namespace", *supported}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        m = re.match(r"^([^!=]+?)\s*(!=|==|=)\s*(.*)$", part)
        if not m:
            raise SelectorError(f"invalid selector: '{text}'; can't understand '{part}'")
        key, op, val = m.group(1), m.group(2), m.group(3)
        if key not in allowed:
            raise SelectorError(f"field label not supported: {key}")
        if alias:  # a label of another API version of the same stored object (events.k8s.io -> core)
            head, _, tail = key.partition(".")
            key = alias.get(key) or (alias[head] + "." + tail if head in alias and tail else key)
        if op == "!=":
            reqs.append(lambda o, k=key, v=val: _field_value(o, k) != v)
        else:
            reqs.append(lambda o, k=key, v=val: _field_value(o, k) == v)
    if not reqs:
        return lambda obj: True
    return lambda obj: all(r(obj) for r in reqs)
