"""Replay recorded kube-apiserver conversations against the local server and list the differences.

Requests are sent in recorded order. Values that differ between servers (resourceVersions, uids,
generated names, continue tokens) are learned from the local answers and substituted into later
requests. Watches run concurrently and are closed when the replay passes their recorded end.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .replay_compare import UUID, Comparer, Mismatch

RECORDINGS = Path(__file__).parent / "recordings"


@dataclass
class Watch:
    rec: dict[str, Any]
    task: asyncio.Task[None] | None = None
    status: int | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    end_ms: float = 0.0


def load(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (RECORDINGS / name).read_text().splitlines() if line.strip()]


def _omitted_body(body: dict[str, Any]) -> str:
    """Rebuild a body the recorder left out: its prefix, padded with its last character, then closed."""
    prefix: str = body["prefix"]
    opened = prefix.count("{") - prefix.count("}")
    closing = '"' + "}" * opened
    return prefix + prefix[-1] * (body["bytes"] - len(prefix) - len(closing)) + closing


class Replayer:
    """Replays recordings in order against one server, keeping the learned value maps across files."""

    def __init__(self, url: str, overrides: dict[tuple[str, int], str] | None = None) -> None:
        self.url = url
        self.rv: dict[str, str] = {}
        self.uid: dict[str, str] = {}
        self.names: dict[str, str] = {}
        self.tokens: dict[str, str] = {}
        self.etags: dict[str, str] = {}
        self.modified: dict[str, str] = {}
        self.overrides = overrides or {}

    # -- learning ------------------------------------------------------------------------------------
    def learn(self, recorded: Any, local: Any) -> None:
        if not isinstance(recorded, dict) or not isinstance(local, dict):
            return
        rm, lm = recorded.get("metadata"), local.get("metadata")
        if isinstance(rm, dict) and isinstance(lm, dict):
            if rm.get("resourceVersion") and lm.get("resourceVersion"):
                self.rv.setdefault(str(rm["resourceVersion"]), str(lm["resourceVersion"]))
            if rm.get("uid") and lm.get("uid"):
                self.uid[rm["uid"]] = lm["uid"]
            if rm.get("generateName") and rm.get("name") and lm.get("name"):
                self.names[rm["name"]] = lm["name"]
            if rm.get("continue") and lm.get("continue"):
                self.tokens[rm["continue"]] = lm["continue"]
        if recorded.get("kind") == "Status" and isinstance(recorded.get("details"), dict):
            rd, ld = recorded["details"], local.get("details") or {}
            if rd.get("uid") and ld.get("uid"):
                self.uid[rd["uid"]] = ld["uid"]
        for key in ("items", "rows"):
            ri, li = recorded.get(key), local.get(key)
            if isinstance(ri, list) and isinstance(li, list):
                by_name = {self._name_of(x): x for x in li}
                for x in ri:
                    lx = by_name.get(self.names.get(self._name_of(x), self._name_of(x)))
                    if lx is not None:
                        self.learn(x.get("object", x), lx.get("object", lx))
        if isinstance(recorded.get("object"), dict) and isinstance(local.get("object"), dict):
            self.learn(recorded["object"], local["object"])

    @staticmethod
    def _name_of(x: Any) -> str:
        if not isinstance(x, dict):
            return ""
        return str(((x.get("object") or x).get("metadata") or {}).get("name", ""))

    # -- rewriting -----------------------------------------------------------------------------------
    def _sub_path(self, path: str) -> str:
        return "/".join(self.names.get(p, p) for p in path.split("/"))

    def _sub_body(self, body: Any) -> Any:
        if isinstance(body, list):
            out = []
            for op in body:
                if isinstance(op, dict) and op.get("path") == "/metadata/resourceVersion" and "value" in op:
                    op = {**op, "value": self.rv.get(str(op["value"]), op["value"])}
                out.append(op)
            return out
        if not isinstance(body, dict):
            return body
        body = json.loads(json.dumps(body))
        meta = body.get("metadata")
        if isinstance(meta, dict):
            if "resourceVersion" in meta and isinstance(meta["resourceVersion"], str):
                meta["resourceVersion"] = self.rv.get(meta["resourceVersion"], meta["resourceVersion"])
            if "uid" in meta:
                meta["uid"] = self.uid.get(meta["uid"], meta["uid"])
            if "name" in meta:
                meta["name"] = self.names.get(meta["name"], meta["name"])
            for ref in meta.get("ownerReferences") or []:
                if isinstance(ref, dict) and "uid" in ref:
                    ref["uid"] = self.uid.get(ref["uid"], ref["uid"])
        pre = body.get("preconditions")
        if isinstance(pre, dict):
            if "resourceVersion" in pre:
                pre["resourceVersion"] = self.rv.get(pre["resourceVersion"], pre["resourceVersion"])
            if "uid" in pre:
                pre["uid"] = self.uid.get(pre["uid"], pre["uid"])
        for key in ("involvedObject", "regarding"):
            ref = body.get(key)
            if isinstance(ref, dict) and "uid" in ref:
                ref["uid"] = self.uid.get(ref["uid"], ref["uid"])
        return body

    def _sub_query(self, query: dict[str, Any]) -> list[tuple[str, str]]:
        out = []
        for k, v in query.items():
            for item in v if isinstance(v, list) else [v]:
                if k == "resourceVersion":
                    item = self.rv.get(item, item)
                elif k == "continue":
                    item = self.tokens.get(item, item)
                elif k == "fieldSelector":
                    item = UUID.sub(lambda m: self.uid.get(m.group(0), m.group(0)), item)
                out.append((k, item))
        return out

    def request_args(self, rec: dict[str, Any], file: str) -> dict[str, Any]:
        headers = dict(rec.get("request_headers") or {})
        for k, v in (rec.get("request_headers_extra") or {}).items():
            headers[k] = self.etags.get(v, v) if k == "If-None-Match" else v
        if rec["status"] == 304 and "If-None-Match" not in headers and rec["path"] in self.modified:
            # kubectl's HTTP cache revalidates with If-Modified-Since, which the recorder did not keep.
            headers["If-Modified-Since"] = self.modified[rec["path"]]
        body = rec.get("request_body")
        data: bytes | None = None
        override = self.overrides.get((file, rec["seq"]))
        if override is not None:
            data = override.encode()
        elif isinstance(body, dict) and "_omitted" in body:
            data = _omitted_body(body).encode()
        elif isinstance(body, str):
            data = body.encode()
        elif body is not None:
            data = json.dumps(self._sub_body(body)).encode()
        return {
            "method": rec["method"],
            "url": self.url + self._sub_path(rec["path"]),
            "params": self._sub_query(rec.get("query") or {}),
            "headers": headers,
            "data": data,
        }


# -- running -------------------------------------------------------------------------------------------
SKIP_AUTO = ("Content-Type", "Accept", "Accept-Encoding", "User-Agent")


class Run:
    """One recorded file replayed against the server."""

    def __init__(self, replayer: Replayer, file: str, hooks: dict[int, Any] | None = None) -> None:
        self.r = replayer
        self.file = file
        self.hooks = hooks or {}
        self.cmp = Comparer(replayer)
        self.mismatches: list[Mismatch] = []
        self.watches: list[Watch] = []

    async def run(self) -> list[Mismatch]:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=None)
        async with aiohttp.ClientSession(skip_auto_headers=SKIP_AUTO, timeout=timeout) as s:
            previous: dict[str, Any] | None = None
            for rec in load(self.file):
                if rec.get("artifact"):
                    continue
                if previous is not None and "poll" in previous.get("phase", "") + rec.get("phase", ""):
                    # Polls waited for a controller; keep (a capped share of) the recorded pause.
                    await asyncio.sleep(min(max(rec["t_ms"] - previous["t_ms"], 0) / 1000, 0.15))
                previous = rec
                if rec["seq"] in self.hooks:
                    await self.hooks[rec["seq"]]()
                for w in [w for w in self.watches if rec["t_ms"] >= w.end_ms]:
                    await self._close(w)
                if rec.get("watch") and rec["status"] == 200:
                    await self._start_watch(s, rec)
                    continue
                await self._request(s, rec)
                if self.watches:
                    await asyncio.sleep(0.005)  # let watch events reach their readers before the next request
            for w in list(self.watches):
                await self._close(w)
        return self.mismatches

    async def _request(self, s: aiohttp.ClientSession, rec: dict[str, Any]) -> None:
        args = self.r.request_args(rec, self.file)
        if "poll" in rec.get("phase", "") and rec["status"] == 404:
            # The recorder polled until a controller deleted the object: poll the same way (bounded).
            for _ in range(100):
                async with s.request(**args) as resp:
                    if resp.status == 404:
                        break
                await asyncio.sleep(0.02)
        async with s.request(**args) as resp:
            raw = await resp.read()
            ctype = resp.headers.get("Content-Type", "")
            warnings = resp.headers.getall("Warning", [])
            warnings = [w[len('299 - "') : -1].replace('\\"', '"') for w in warnings]
            warnings = ['299 - "' + w.replace('"', '\\"') + '"' for w in warnings]
            status = resp.status
            rec_etag = (rec.get("response_headers_extra") or {}).get("ETag")
            if rec_etag and resp.headers.get("ETag"):
                self.r.etags[rec_etag] = resp.headers["ETag"]
            if resp.headers.get("Last-Modified"):
                self.r.modified[rec["path"]] = resp.headers["Last-Modified"]
        body: Any
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        if isinstance(body, dict):
            self.r.learn(rec.get("response_body"), body)
        self.mismatches.extend(self.cmp.compare(rec, status, ctype, warnings, body))

    async def _start_watch(self, s: aiohttp.ClientSession, rec: dict[str, Any]) -> None:
        w = Watch(rec, end_ms=rec["t_ms"] + (rec.get("duration_ms") or 0))
        args = self.r.request_args(rec, self.file)

        async def reader() -> None:
            try:
                async with s.request(**args) as resp:
                    w.status = resp.status
                    w.ready.set()
                    recorded = rec["response_body"] if isinstance(rec["response_body"], list) else []
                    async for line in resp.content:
                        if not line.strip():
                            continue
                        ev = json.loads(line)
                        i = len(w.events)
                        w.events.append(ev)
                        if i < len(recorded) and recorded[i].get("type") == ev.get("type"):
                            self.r.learn(recorded[i].get("object"), ev.get("object"))
            except (aiohttp.ClientError, asyncio.CancelledError):
                pass
            finally:
                w.ready.set()

        w.task = asyncio.create_task(reader())
        self.watches.append(w)
        await asyncio.wait_for(w.ready.wait(), 10)

    async def _close(self, w: Watch) -> None:
        self.watches.remove(w)
        await asyncio.sleep(0.05)
        if w.task is not None and not w.task.done():
            w.task.cancel()
            try:
                await w.task
            except asyncio.CancelledError:
                pass
        if w.status != w.rec["status"]:
            self.mismatches.append(Mismatch(w.rec["seq"], "status", w.rec["status"], w.status))
            return
        self.mismatches.extend(self.cmp.events(w.rec, w.events))
