"""GET, list and watch: resourceVersion semantics, selectors, pagination and the watch stream.

A watcher is an asyncio queue fed by the store on every write, so hundreds of watchers cost nothing
while idle. Watch errors (410 for a too-old RV) arrive inside HTTP 200 as an ERROR event, as upstream.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from loraplane.localkube import builtins, status, tables
from loraplane.localkube.selectors import SelectorError, parse_fields, parse_labels
from loraplane.localkube.status import ApiError

if TYPE_CHECKING:
    from loraplane.localkube.cluster import Cluster
    from loraplane.localkube.resources import ResourceType

Obj = dict[str, Any]
BOOKMARK_INTERVAL = 60.0
GONE_LIST = "The resourceVersion for the provided list is too old."


def parse_rv(text: str | None) -> int | None:
    if text in (None, ""):
        return None
    if not str(text).isdigit():
        raise ApiError(
            400,
            f'invalid resource version: resourceVersion: Invalid value: "{text}": '
            f'strconv.ParseUint: parsing "{text}": invalid syntax',
        )
    return int(str(text))


def predicate(rt: ResourceType, ns: str | None, q: Any) -> Any:
    try:
        by_label = parse_labels(q.get("labelSelector", ""))
        by_field = parse_fields(q.get("fieldSelector", ""), rt.field_labels, builtins.field_alias(rt))
    except SelectorError as e:
        raise ApiError(400, str(e)) from None
    if ns is None or not rt.namespaced:
        return lambda o: by_label(o) and by_field(o)
    return lambda o: (o["metadata"].get("namespace") == ns) and by_label(o) and by_field(o)


def _encode_continue(rv: int, key: tuple[str, str]) -> str:
    start = f"/{key[0]}/{key[1]}\u0000" if key[0] else f"/{key[1]}\u0000"
    raw = json.dumps({"v": "meta.k8s.io/v1", "rv": rv, "start": start}, separators=(",", ":"))
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def _decode_continue(token: str) -> tuple[int, str]:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        return int(data["rv"]), str(data["start"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        bad = "\\u009e" if token.startswith("not") else "\\ufffd"
        raise ApiError(
            400,
            f"invalid continue token: continue key is not valid: invalid character '{bad}' "
            "looking for beginning of value",
        ) from None


def _sort_key(obj: Obj) -> str:
    m = obj["metadata"]
    return f"/{m['namespace']}/{m['name']}" if m.get("namespace") else f"/{m['name']}"


async def list_objects(cluster: Cluster, rt: ResourceType, ns: str | None, q: Any) -> tuple[list[Obj], Obj]:
    """Return (items, list metadata) honouring RV, RV match, selectors, limit and continue."""
    store = cluster.store
    rv = parse_rv(q.get("resourceVersion"))
    match = q.get("resourceVersionMatch", "")
    causes = []
    if match and rv is None:
        causes.append(
            {
                "reason": "FieldValueForbidden",
                "field": "resourceVersionMatch",
                "message": "Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided",
            }
        )
    if match and match not in ("Exact", "NotOlderThan"):
        causes.append(
            {
                "reason": "FieldValueNotSupported",
                "field": "resourceVersionMatch",
                "message": f'Unsupported value: "{match}": supported values: "Exact", "NotOlderThan"',
            }
        )
    if q.get("sendInitialEvents"):
        causes.append(
            {
                "reason": "FieldValueForbidden",
                "field": "sendInitialEvents",
                "message": "Forbidden: sendInitialEvents is forbidden for list",
            }
        )
    if causes:
        raise status.options_invalid("ListOptions", causes)
    if rv is not None and rv > store.rv:
        deadline = time.monotonic() + 3.0
        while store.rv < rv and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if store.rv < rv:
            raise ApiError(
                504,
                f"Timeout: Too large resource version: {rv}, current: {store.rv}",
                "Timeout",
                {
                    "causes": [
                        {"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}
                    ],
                    "retryAfterSeconds": 1,
                },
            )
    limit = int(q.get("limit") or 0)
    token = q.get("continue", "")
    start = ""
    at = store.rv
    if token:
        at, start = _decode_continue(token)
        if at < store.compacted_rv:
            raise ApiError(
                410,
                "The provided continue parameter is too old to display a consistent list result. "
                "You can start a new list without the continue parameter.",
                "Expired",
            )
        if rv == 0:
            limit = 0
    elif match == "Exact" and rv is not None:
        if rv < store.compacted_rv:
            raise ApiError(410, GONE_LIST, "Expired")
        at = rv
    elif rv == 0 and not match:
        limit = 0  # served from the watch cache: limit is ignored, as upstream
    accept = predicate(rt, ns, q)
    source = store.snapshot(rt.storage, at) if at != store.rv else store.objects.get(rt.storage, {})
    items = [o for o in source.values() if accept(o)]
    items.sort(key=_sort_key)
    if start:
        items = [o for o in items if _sort_key(o) + "\u0000" > start]
    meta: Obj = {"resourceVersion": str(at)}
    if limit and len(items) > limit:
        rest = len(items) - limit
        items = items[:limit]
        last = items[-1]["metadata"]
        meta["continue"] = _encode_continue(at, (last.get("namespace", ""), last["name"]))
        meta["remainingItemCount"] = rest
    elif rt.custom:
        meta["continue"] = ""  # unstructured lists carry an empty continue; typed lists omit it
    return [builtins.from_storage(rt, o) for o in items], meta


class WatchStream:
    """One watch request: initial events, replay, live events, bookmarks and the timeout."""

    def __init__(self, cluster: Cluster, rt: ResourceType, ns: str | None, q: Any, as_table: bool) -> None:
        self.cluster, self.rt, self.q, self.as_table = cluster, rt, q, as_table
        self.accept = predicate(rt, ns, q)
        self.bookmarks = q.get("allowWatchBookmarks") == "true"
        self.table_columns_sent = False
        timeout = q.get("timeoutSeconds")
        self.timeout = float(timeout) if timeout else float(random.randint(1800, 3600))
        self._validate()

    def _validate(self) -> None:
        q = self.q
        sie = q.get("sendInitialEvents")
        match = q.get("resourceVersionMatch", "")
        if sie is not None and match != "NotOlderThan":
            causes = [
                {
                    "reason": "FieldValueForbidden",
                    "field": "resourceVersionMatch",
                    "message": "Forbidden: sendInitialEvents requires setting resourceVersionMatch to NotOlderThan",
                }
            ]
            if match:
                causes.append(
                    {
                        "reason": "FieldValueNotSupported",
                        "field": "resourceVersionMatch",
                        "message": f'Unsupported value: "{match}": supported values: "NotOlderThan"',
                    }
                )
            raise status.options_invalid("ListOptions", causes)
        parse_rv(q.get("resourceVersion"))

    def _line(self, typ: str, obj: Obj) -> bytes:
        if self.as_table and typ != "ERROR" and typ != "BOOKMARK":
            t = tables.table(
                self.rt,
                [obj],
                obj["metadata"].get("resourceVersion", ""),
                with_columns=not self.table_columns_sent,
            )
            self.table_columns_sent = True
            obj = t
        return json.dumps({"type": typ, "object": obj}, separators=(",", ":")).encode() + b"\n"

    def _event_line(self, ev: Any) -> bytes:
        if self.as_table:
            return self._line(ev.type, builtins.from_storage(self.rt, ev.obj))
        line = ev.lines.get(self.rt.api_version)
        if line is None:
            line = ev.lines[self.rt.api_version] = self._line(ev.type, builtins.from_storage(self.rt, ev.obj))
        return line

    def _bookmark(self, rv: int, initial_end: bool = False) -> bytes:
        meta: Obj = {"resourceVersion": str(rv)}
        if initial_end:
            meta = {"annotations": {"k8s.io/initial-events-end": "true"}, "resourceVersion": str(rv)}
        obj = {"kind": self.rt.kind, "apiVersion": self.rt.api_version, "metadata": meta}
        return json.dumps({"type": "BOOKMARK", "object": obj}, separators=(",", ":")).encode() + b"\n"

    async def serve(self, request: web.Request, content_type: str) -> web.StreamResponse:
        store = self.cluster.store
        rv = parse_rv(self.q.get("resourceVersion"))
        sie = self.q.get("sendInitialEvents")
        initial = sie == "true" or (sie is None and (rv in (None, 0)))
        resp = web.StreamResponse(
            status=200, headers={"Content-Type": content_type, "Cache-Control": "no-cache, private"}
        )
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if not initial and rv is not None and rv < store.compacted_rv:
            err = {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": f"too old resource version: {rv} ({store.compacted_rv + 1})",
                "reason": "Expired",
                "code": 410,
            }
            await resp.write(
                json.dumps({"type": "ERROR", "object": err}, separators=(",", ":")).encode() + b"\n"
            )
            await resp.write_eof()
            return resp
        start_rv = store.rv if initial or rv is None else rv
        watcher = store.subscribe(self.rt.storage, self.accept, start_rv)
        try:
            chunks: list[bytes] = []
            if initial:
                objs = sorted(
                    (o for o in store.objects.get(self.rt.storage, {}).values() if self.accept(o)),
                    key=_sort_key,
                )
                chunks = [self._line("ADDED", builtins.from_storage(self.rt, o)) for o in objs]
                if self.bookmarks and (sie == "true" or self.q.get("resourceVersionMatch") is None):
                    chunks.append(self._bookmark(max(start_rv, rv or 0), initial_end=True))
            else:
                store.replay(watcher, start_rv)
            if chunks:
                await resp.write(b"".join(chunks))
            await self._pump(resp, watcher, start_rv)
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            store.unsubscribe(watcher)
        try:
            await resp.write_eof()
        except (ConnectionResetError, RuntimeError):
            pass
        return resp

    async def _pump(self, resp: web.StreamResponse, watcher: Any, start_rv: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        last_rv = start_rv
        final_bookmark_sent = False
        next_bookmark = loop.time() + BOOKMARK_INTERVAL
        while True:
            now = loop.time()
            if now >= deadline:
                return
            pre_deadline = deadline - 2.0
            wake = min(
                deadline,
                next_bookmark,
                pre_deadline
                if not final_bookmark_sent and self.bookmarks and pre_deadline > now
                else deadline,
            )
            try:
                ev = await asyncio.wait_for(watcher.queue.get(), timeout=max(0.0, wake - now))
            except TimeoutError:
                now = loop.time()
                if self.bookmarks and (
                    now >= next_bookmark or (now >= pre_deadline and not final_bookmark_sent)
                ):
                    if now >= pre_deadline:
                        final_bookmark_sent = True
                    next_bookmark = now + BOOKMARK_INTERVAL
                    # Like the watch cache: a bookmark once the resource's RV moved past the watch's start.
                    if self.cluster.store.rv > start_rv:
                        last_rv = self.cluster.store.rv
                        await resp.write(self._bookmark(last_rv))
                continue
            batch = [ev]
            while not watcher.queue.empty() and len(batch) < 256:
                batch.append(watcher.queue.get_nowait())
            data = b"".join(self._event_line(e) for e in batch)
            last_rv = batch[-1].rv
            await resp.write(data)
