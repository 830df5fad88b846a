"""Comparison of a recorded kube-apiserver answer with localkube's, field by field where fields are stable."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

import yaml


class Names(Protocol):
    names: dict[str, str]


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
NUMBERS_IN = [
    re.compile(r"(too old resource version: )\d+ \(\d+\)"),
    re.compile(r"(Too large resource version: )\d+, current: \d+"),
    re.compile(
        r"(the ResourceVersion in the precondition )\(\d+\) does not match the ResourceVersion in record \(\d+\)"
    ),
]


@dataclass
class Mismatch:
    seq: int
    what: str
    recorded: Any
    local: Any

    def __str__(self) -> str:
        return f"seq {self.seq} {self.what}: recorded {self.recorded!r} != local {self.local!r}"


def norm_message(msg: str) -> str:
    for rx in NUMBERS_IN:
        msg = rx.sub(lambda m: m.group(1) + "<rv>", msg)
    msg = UUID.sub("<uid>", msg)
    return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", "<time>", msg)


def _warnings(headers: Any) -> list[str]:
    if headers is None:
        return []
    if isinstance(headers, str):
        return [headers]
    return list(headers)


def _is_table_age(col: dict[str, Any]) -> bool:
    return col.get("type") == "date" or col.get("name") in ("Age", "Last Seen", "First Seen")


def _causes(b: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        (c.get("reason", ""), c.get("field", ""), norm_message(c.get("message", "")))
        for c in (b.get("details") or {}).get("causes") or []
    ]


def _same_causes_any_order(rb: dict[str, Any], lb: dict[str, Any]) -> bool:
    rc, lc = _causes(rb), _causes(lb)
    if not rc or sorted(rc) != sorted(lc):
        return False
    head = norm_message(lb.get("message", "")).split(" is invalid: ")[0]
    parts = [f"{f}: {m}" for _, f, m in lc]
    joined = parts[0] if len(parts) == 1 else "[" + ", ".join(parts) + "]"
    return norm_message(rb.get("message", "")).startswith(head) and norm_message(
        lb.get("message", "")
    ).endswith(joined)


class Comparer:
    """Compares one recorded answer with the local one, field by field where fields are stable."""

    def __init__(self, replayer: Names) -> None:
        self.r = replayer
        self.back = {v: k for k, v in replayer.names.items()}

    def name(self, local_name: Any) -> Any:
        return self.back.get(local_name, local_name)

    def compare(
        self, rec: dict[str, Any], status: int, ctype: str, warnings: list[str], body: Any
    ) -> list[Mismatch]:
        self.back = {v: k for k, v in self.r.names.items()}
        seq = rec["seq"]
        out: list[Mismatch] = []
        if rec["status"] != status:
            return [Mismatch(seq, "status", rec["status"], status)]
        rct = (rec.get("response_headers") or {}).get("Content-Type")
        if rct and rct.split(";")[0] != (ctype or "").split(";")[0]:
            out.append(Mismatch(seq, "Content-Type", rct, ctype))
        rw = sorted(_warnings((rec.get("response_headers") or {}).get("Warning")))
        if rw != sorted(warnings):
            out.append(Mismatch(seq, "Warning", rw, sorted(warnings)))
        out.extend(self.body(seq, rec["response_body"], body))
        return out

    def body(self, seq: int, rb: Any, lb: Any, where: str = "body") -> list[Mismatch]:
        if rb is None or (isinstance(rb, dict) and ("_omitted" in rb or "_binary" in rb)):
            return []
        if isinstance(rb, str) and isinstance(lb, str) and rb.startswith("apiVersion:"):
            rb, lb = yaml.safe_load(rb), yaml.safe_load(lb)  # YAML answers: compare as objects
        if isinstance(rb, str):
            return [] if rb == lb else [Mismatch(seq, where, rb[:80], str(lb)[:80])]
        if not isinstance(lb, dict) or not isinstance(rb, dict):
            return [Mismatch(seq, f"{where} type", type(rb).__name__, type(lb).__name__)]
        if rb.get("_trimmed"):
            return (
                []
                if rb.get("kind") == lb.get("kind")
                else [Mismatch(seq, f"{where}.kind", rb.get("kind"), lb.get("kind"))]
            )
        kind = rb.get("kind")
        if kind != lb.get("kind"):
            return [Mismatch(seq, f"{where}.kind", kind, lb.get("kind"))]
        if kind == "Status":
            return self.status(seq, rb, lb, where)
        if kind == "Table":
            return self.table(seq, rb, lb, where)
        if isinstance(rb.get("items"), list):
            return self.list(seq, rb, lb, where)
        if "metadata" in rb and "name" in (rb.get("metadata") or {}):
            return self.object(seq, rb, lb, where)
        if sorted(rb) != sorted(lb):
            return [Mismatch(seq, f"{where} keys", sorted(rb), sorted(lb))]
        return []

    def status(self, seq: int, rb: dict[str, Any], lb: dict[str, Any], where: str) -> list[Mismatch]:
        out = []
        for key in ("status", "reason", "code"):
            if rb.get(key) != lb.get(key):
                out.append(Mismatch(seq, f"{where}.{key}", rb.get(key), lb.get(key)))
        rm, lm = norm_message(rb.get("message", "")), norm_message(lb.get("message", ""))
        if rm != lm and _same_causes_any_order(rb, lb):
            # kube-apiserver lists schema errors in Go map order (random per run); compare them as a set.
            lm = rm
        if " is invalid: patch: Invalid value: " in rm:  # embeds the whole object: compare the frame only
            rm, lm = rm.split("Invalid value:")[0], lm.split("Invalid value:")[0]
        if rm != lm:
            out.append(Mismatch(seq, f"{where}.message", rm, lm))
        rd, ld = rb.get("details"), lb.get("details")
        if (rd is None) != (ld is None):
            out.append(Mismatch(seq, f"{where}.details", rd, ld))
        elif rd is not None:
            for key in ("group", "kind", "retryAfterSeconds"):
                if rd.get(key) != ld.get(key):
                    out.append(Mismatch(seq, f"{where}.details.{key}", rd.get(key), ld.get(key)))
            if rd.get("name") != self.name(ld.get("name")):
                out.append(Mismatch(seq, f"{where}.details.name", rd.get("name"), ld.get("name")))
            rc = [
                (c.get("reason"), c.get("field"), norm_message(c.get("message", "")))
                for c in rd.get("causes") or []
            ]
            lc = [
                (c.get("reason"), c.get("field"), norm_message(c.get("message", "")))
                for c in ld.get("causes") or []
            ]
            if rc and " is invalid: patch: " in rb.get("message", ""):
                rc = [(a, b, m.split("Invalid value:")[0]) for a, b, m in rc]
                lc = [(a, b, m.split("Invalid value:")[0]) for a, b, m in lc]
            if rc != lc and sorted(rc) != sorted(lc):
                out.append(Mismatch(seq, f"{where}.details.causes", rc, lc))
        return out

    def object(self, seq: int, rb: dict[str, Any], lb: dict[str, Any], where: str) -> list[Mismatch]:
        out = []
        if rb.get("apiVersion") != lb.get("apiVersion"):
            out.append(Mismatch(seq, f"{where}.apiVersion", rb.get("apiVersion"), lb.get("apiVersion")))
        if sorted(rb) != sorted(lb):
            out.append(Mismatch(seq, f"{where} keys", sorted(rb), sorted(lb)))
        rm, lm = rb.get("metadata") or {}, lb.get("metadata") or {}
        rkeys = sorted(set(rm) - {"managedFields", "selfLink"})
        lkeys = sorted(set(lm) - {"managedFields", "selfLink"})
        if rkeys != lkeys:
            out.append(Mismatch(seq, f"{where}.metadata keys", rkeys, lkeys))
        for key in ("generation", "labels", "finalizers", "deletionGracePeriodSeconds"):
            if rm.get(key) != lm.get(key):
                out.append(Mismatch(seq, f"{where}.metadata.{key}", rm.get(key), lm.get(key)))
        if rm.get("name") != self.name(lm.get("name")):
            out.append(Mismatch(seq, f"{where}.metadata.name", rm.get("name"), lm.get("name")))
        for key in ("spec", "data", "involvedObject", "regarding", "note", "message", "reason", "type"):
            if key in rb and norm_message(json.dumps(rb[key], sort_keys=True)) != norm_message(
                json.dumps(lb.get(key), sort_keys=True)
            ):
                out.append(Mismatch(seq, f"{where}.{key}", rb[key], lb.get(key)))
        if isinstance(rb.get("status"), dict) and rb.get("kind") not in (
            "CustomResourceDefinition",
            "Namespace",
        ):
            rs = norm_message(json.dumps(rb["status"], sort_keys=True))
            ls = norm_message(json.dumps(lb.get("status"), sort_keys=True))
            if rs != ls and not rb.get("apiVersion", "").startswith("kopf.dev"):
                out.append(Mismatch(seq, f"{where}.status", rb["status"], lb.get("status")))
        return out

    def list(self, seq: int, rb: dict[str, Any], lb: dict[str, Any], where: str) -> list[Mismatch]:
        out = []
        rn = [x.get("metadata", {}).get("name") for x in rb["items"]]
        ln = [self.name(x.get("metadata", {}).get("name")) for x in lb.get("items") or []]
        generated = set(self.back.values())
        if rn != ln and not (sorted(rn) == sorted(ln) and generated & set(rn)):
            # Lists are in key order; generated name suffixes sort differently on each server.
            out.append(Mismatch(seq, f"{where}.items", rn, ln))
        rk = sorted(k for k in (rb.get("metadata") or {}) if k != "resourceVersion")
        lk = sorted(k for k in (lb.get("metadata") or {}) if k != "resourceVersion")
        if rk != lk:
            out.append(Mismatch(seq, f"{where}.metadata keys", rk, lk))
        return out

    def table(self, seq: int, rb: dict[str, Any], lb: dict[str, Any], where: str) -> list[Mismatch]:
        out = []
        rcols, lcols = rb.get("columnDefinitions"), lb.get("columnDefinitions")
        if rcols != lcols:
            out.append(Mismatch(seq, f"{where}.columnDefinitions", rcols, lcols))
        keep = [i for i, c in enumerate(rcols or []) if not _is_table_age(c)]
        if not rcols:
            keep = list(range(len(((rb.get("rows") or [{}])[0]).get("cells") or [])))[:-1]

        def cells(rows: Any, local: bool) -> list[Any]:
            res = []
            for row in rows or []:
                cs = list(row.get("cells") or [])
                if local:
                    cs = [self.name(c) if isinstance(c, str) else c for c in cs]
                res.append([cs[i] for i in keep if i < len(cs)])
            return sorted(res, key=json.dumps)  # generated names sort differently on each server

        if cells(rb.get("rows"), False) != cells(lb.get("rows"), True):
            out.append(
                Mismatch(seq, f"{where}.rows", cells(rb.get("rows"), False), cells(lb.get("rows"), True))
            )
        return out

    def events(self, rec: dict[str, Any], local: list[dict[str, Any]]) -> list[Mismatch]:
        def shape(evs: list[dict[str, Any]], is_local: bool) -> list[tuple[str, Any]]:
            res = []
            for e in evs:
                obj = e.get("object") or {}
                if e.get("type") == "BOOKMARK":
                    ann = (obj.get("metadata") or {}).get("annotations") or {}
                    if ann.get("k8s.io/initial-events-end") == "true":
                        res.append(("BOOKMARK", "initial-events-end"))
                    continue
                if e.get("type") == "ERROR":
                    res.append(("ERROR", obj.get("code")))
                    continue
                if obj.get("kind") == "Table":
                    name = ((obj.get("rows") or [{}])[0].get("cells") or [None])[0]
                else:
                    name = (obj.get("metadata") or {}).get("name")
                res.append((e.get("type"), self.name(name) if is_local else name))
            return res

        rs, ls = shape(rec["response_body"], False), shape(local, True)
        return [] if rs == ls else [Mismatch(rec["seq"], "watch events", rs, ls)]
