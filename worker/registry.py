"""What this worker can serve right now: served name -> the current adapter version, keyed by ID.

The control path (watch -> resolve -> prefetch -> validate) writes it; the engine and the HTTP API
read it. A request resolves its ``model`` name here once, at admission, and from then on uses the
adapter *ID*: a new version (new ID) replaces the name's entry atomically, while requests already
running keep the old ID until they finish. Thread-safe: the control path runs in its own thread or
event loop, the API in another.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from .inference.engines import LoraSpec

State = Literal["Pending", "Prefetching", "Validating", "Ready", "Failed"]


@dataclass(frozen=True)
class VersionEntry:
    """One adapter version as the worker knows it. Immutable: updates replace the whole entry."""

    id: int
    served_name: str
    adapter: str  # namespace/name of the LoRAAdapter
    state: State = "Pending"
    reason: str | None = None
    message: str | None = None
    local_dir: Path | None = None  # complete cache entry (adapter_config.json + adapter_model.safetensors)
    max_length: int | None = None  # spec.longContext.maxLength
    rank: int | None = None
    scaling: float | None = None
    warnings: tuple[str, ...] = ()
    chat_template: str | None = None  # the adapter's own (None: the base model's)

    def with_state(self, state: State, **changes: Any) -> VersionEntry:
        return replace(self, state=state, **changes)

    def lora_spec(self) -> LoraSpec:
        """What an engine is handed: the ID, the served name, this version's cache directory."""
        assert self.local_dir is not None, "only a prefetched version goes to an engine"
        return LoraSpec(
            id=self.id,
            name=self.served_name,
            path=self.local_dir,
            max_length=self.max_length,
            chat_template=self.chat_template,
        )


Listener = Callable[[VersionEntry | None, VersionEntry | None], None]


def takes_over(current: VersionEntry | None, new: VersionEntry | None) -> bool:
    """The hand-over rule between two versions of a served name (the only place it is decided): ``new``
    takes the name and its traffic from ``current`` once it is Ready, or at once when ``current`` serves
    nothing (it is not Ready, or there is none). A newer version that has no entry yet (None) takes over
    only from one that serves nothing. The registry moves the name by it; the controller keeps an old
    version alive, or drops it, by it."""
    if current is None or current.state != "Ready":
        return True
    return new is not None and (new.id == current.id or new.state == "Ready")


@dataclass
class Registry:
    """Adapter versions by ID, and which ID each served name points at."""

    _by_id: dict[int, VersionEntry] = field(default_factory=dict)
    _current: dict[str, int] = field(default_factory=dict)  # served name -> id
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _listeners: list[Listener] = field(default_factory=list)
    elsewhere: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Served name -> the workers (namespace/name) holding an adapter of this base model that is placed
    on others, not here (the watch keeps it): a request for it gets a 404 that names them."""

    def upsert(self, version: VersionEntry) -> None:
        """Add or update a version. The served name moves to it only once it is Ready, or when the
        name has no Ready version yet (so a user sees why the new one is not servable)."""
        with self._lock:
            old = self._by_id.get(version.id)
            self._by_id[version.id] = version
            holder = self._by_id.get(self._current.get(version.served_name, -1))
            if takes_over(holder, version):
                self._current[version.served_name] = version.id
        self._notify(old, version)

    def remove(self, adapter_id: int) -> VersionEntry | None:
        """Forget a version (deleted, name lost, or replaced by a Ready newer one)."""
        with self._lock:
            old = self._by_id.pop(adapter_id, None)
            if old is not None and self._current.get(old.served_name) == adapter_id:
                del self._current[old.served_name]
                # Fall back to another known version of the same name, newest ID first.
                others = sorted(
                    (v for v in self._by_id.values() if v.served_name == old.served_name),
                    key=lambda v: (v.state == "Ready", v.id),
                )
                if others:
                    self._current[old.served_name] = others[-1].id
        if old is not None:
            self._notify(old, None)
        return old

    def lookup(self, served_name: str) -> VersionEntry | None:
        """The version a new request for ``served_name`` gets (Ready or not), or None if unknown."""
        with self._lock:
            adapter_id = self._current.get(served_name)
            return None if adapter_id is None else self._by_id.get(adapter_id)

    def by_id(self, adapter_id: int) -> VersionEntry | None:
        with self._lock:
            return self._by_id.get(adapter_id)

    def snapshot(self) -> list[VersionEntry]:
        with self._lock:
            return sorted(self._by_id.values(), key=lambda v: v.id)

    def ready(self) -> list[VersionEntry]:
        """Ready versions that their served name currently points at (what /v1/models lists)."""
        with self._lock:
            return sorted(
                (self._by_id[i] for i in self._current.values() if self._by_id[i].state == "Ready"),
                key=lambda v: v.served_name,
            )

    def on_retired(self, retire: Callable[[int], None]) -> None:
        """Call ``retire(id)`` when a version will get no new requests (removed, or Failed): an engine
        then frees it once the requests already running on it finish."""

        def listener(old: VersionEntry | None, new: VersionEntry | None) -> None:
            if old is not None and (new is None or new.state == "Failed"):
                retire(old.id)

        self.subscribe(listener)

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(old, new)`` after every change (new is None on removal). Keep it cheap."""
        with self._lock:
            self._listeners.append(listener)

    def _notify(self, old: VersionEntry | None, new: VersionEntry | None) -> None:
        for listener in list(self._listeners):
            listener(old, new)
