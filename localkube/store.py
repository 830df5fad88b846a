"""In-memory object storage with one global resourceVersion counter, a bounded event history and watchers.

Everything runs on the server's event loop, so no locks are needed. Objects are replaced, never mutated
in place, so a write costs O(object) and readers and watch events can share the stored dicts.
The history window is what makes 410 Gone real: a watch or list from an RV older than the oldest
retained event is refused, as kube-apiserver's watch cache does.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, name); namespace "" for cluster-scoped objects

DEFAULT_HISTORY = 20000


@dataclass(slots=True)
class Event:
    """One change: type is ADDED, MODIFIED or DELETED; old is the previous state (None for ADDED)."""

    rv: int
    storage: str
    type: str
    obj: Obj
    old: Obj | None
    # Serialized watch lines per API version, shared by all watchers of the event.
    lines: dict[str, bytes] = field(default_factory=dict)


@dataclass(eq=False)
class Watcher:
    """A subscriber to one storage; `accepts` filters by namespace and selectors."""

    storage: str
    accepts: Callable[[Obj], bool]
    min_rv: int = 0
    queue: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)

    def offer(self, ev: Event) -> None:
        if ev.rv <= self.min_rv:
            return
        new_ok = ev.type != "DELETED" and self.accepts(ev.obj)
        old_ok = ev.old is not None and self.accepts(ev.old)
        if ev.type == "DELETED":
            if self.accepts(ev.obj):
                self.queue.put_nowait(ev)
        elif ev.type == "ADDED":
            if new_ok:
                self.queue.put_nowait(ev)
        elif new_ok and old_ok:
            self.queue.put_nowait(ev)
        elif new_ok:
            # The object entered the selector: a watcher sees it appear.
            self.queue.put_nowait(Event(ev.rv, ev.storage, "ADDED", ev.obj, None))
        elif old_ok:
            # It left the selector: kube-apiserver sends DELETED with the new state's RV on the old object.
            gone = dict(ev.old)  # type: ignore[arg-type]
            gone["metadata"] = {**gone.get("metadata", {}), "resourceVersion": str(ev.rv)}
            self.queue.put_nowait(Event(ev.rv, ev.storage, "DELETED", gone, None))


class Store:
    """Objects by storage key, the RV counter, history and watchers."""

    def __init__(self, history: int = DEFAULT_HISTORY) -> None:
        self.rv = 0
        self.objects: dict[str, dict[Key, Obj]] = {}
        self.history: deque[Event] = deque()
        self.history_limit = history
        self.compacted_rv = 0
        self.watchers: dict[str, set[Watcher]] = {}
        self.listeners: list[Callable[[Event], None]] = []

    # -- reading -------------------------------------------------------------------------------------
    def bucket(self, storage: str) -> dict[Key, Obj]:
        return self.objects.setdefault(storage, {})

    def get(self, storage: str, ns: str, name: str) -> Obj | None:
        return self.objects.get(storage, {}).get((ns, name))

    def items(self, storage: str, ns: str | None = None) -> Iterable[Obj]:
        for (ons, _), obj in self.objects.get(storage, {}).items():
            if ns is None or ons == ns:
                yield obj

    def snapshot(self, storage: str, at_rv: int) -> dict[Key, Obj]:
        """The storage's state at `at_rv` (the caller checked at_rv >= compacted_rv): undo later events."""
        state = dict(self.objects.get(storage, {}))
        for ev in reversed(self.history):
            if ev.rv <= at_rv:
                break
            if ev.storage != storage:
                continue
            meta = ev.obj.get("metadata", {})
            key = (meta.get("namespace", ""), meta.get("name", ""))
            if ev.type == "ADDED":
                state.pop(key, None)
            elif ev.old is not None:
                state[key] = ev.old
        return state

    # -- writing -------------------------------------------------------------------------------------
    def next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def set_history_limit(self, n: int) -> None:
        """Shrink or grow the event window (tests shrink it to provoke 410 Gone)."""
        self.history_limit = max(1, n)
        self._trim()

    def _trim(self) -> None:
        while len(self.history) > self.history_limit:
            self.compacted_rv = self.history.popleft().rv

    def write(self, storage: str, obj: Obj, old: Obj | None) -> Obj:
        """Store `obj` (its metadata.resourceVersion already set by `stamp`) and notify watchers."""
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        self.bucket(storage)[key] = obj
        self._emit(Event(int(meta["resourceVersion"]), storage, "MODIFIED" if old else "ADDED", obj, old))
        return obj

    def delete(self, storage: str, obj: Obj) -> Obj:
        """Remove the object; the DELETED event carries the object with the deletion's RV."""
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        self.bucket(storage).pop(key, None)
        rv = self.next_rv()
        gone = {**obj, "metadata": {**meta, "resourceVersion": str(rv)}}
        self._emit(Event(rv, storage, "DELETED", gone, obj))
        return gone

    def _emit(self, ev: Event) -> None:
        self.history.append(ev)
        self._trim()
        for w in self.watchers.get(ev.storage, ()):
            w.offer(ev)
        for listener in self.listeners:
            listener(ev)

    # -- watching ------------------------------------------------------------------------------------
    def subscribe(self, storage: str, accepts: Callable[[Obj], bool], min_rv: int) -> Watcher:
        w = Watcher(storage, accepts, min_rv)
        self.watchers.setdefault(storage, set()).add(w)
        return w

    def unsubscribe(self, w: Watcher) -> None:
        self.watchers.get(w.storage, set()).discard(w)

    def replay(self, w: Watcher, since_rv: int) -> None:
        """Queue the retained events after since_rv for a watcher that starts in the past."""
        for ev in self.history:
            if ev.rv > since_rv and ev.storage == w.storage:
                w.offer(ev)
