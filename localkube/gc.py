"""Garbage collection and namespace deletion, as kube-controller-manager does them, but sooner.

Triggered by store events (deletes, deletion marks, new owned objects) and run on the next loop turn,
so a write never waits for it. Background: dependents whose owners are all gone are deleted.
Foreground: the owner keeps `foregroundDeletion` until its dependents are gone. Orphan: dependents
lose their ownerReferences and the owner goes. A terminating namespace stays so for NAMESPACE_DELAY,
then deletes its content and goes when nothing is left.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from loraplane.localkube.status import ApiError
from loraplane.localkube.store import Event

if TYPE_CHECKING:
    from loraplane.localkube.cluster import Cluster
    from loraplane.localkube.resources import ResourceType

Obj = dict[str, Any]
Ref = tuple[str, str, str]  # storage, namespace, name
GC_DELAY = 0.02  # seconds between a triggering write and the collector's pass
# A deleted namespace stays Terminating, content and all, this long before the namespace controller
# empties it: kube-controller-manager took 5-10 s. Long enough that a test depending on an instant
# deletion fails here too, short enough not to slow the suite.
NAMESPACE_DELAY = 0.5


class GarbageCollector:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.uids: dict[str, Ref] = {}
        self.owned: set[Ref] = set()
        self.pending: set[Ref] = set()  # objects with deletionTimestamp
        self.scheduled = False
        self.terminating: dict[str, float] = {}  # namespace -> when its deletion was first seen (monotonic)
        self.woken = False
        cluster.store.listeners.append(self.on_event)

    def on_event(self, ev: Event) -> None:
        meta = ev.obj.get("metadata") or {}
        ref = (ev.storage, meta.get("namespace", ""), meta.get("name", ""))
        trigger = False
        if ev.type == "DELETED":
            if ev.storage == "/namespaces":
                self.terminating.pop(ref[2], None)
            self.uids.pop(meta.get("uid", ""), None)
            self.owned.discard(ref)
            self.pending.discard(ref)
            trigger = bool(self.owned) or bool(self.pending)
        else:
            self.uids[meta.get("uid", "")] = ref
            if meta.get("ownerReferences"):
                self.owned.add(ref)
                trigger = (
                    trigger
                    or ev.type == "ADDED"
                    or not (ev.old or {}).get("metadata", {}).get("ownerReferences")
                )
            else:
                self.owned.discard(ref)
            if meta.get("deletionTimestamp"):
                self.pending.add(ref)
                trigger = True
        if trigger:
            self.schedule()

    def schedule(self) -> None:
        if self.scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.scheduled = True
        # Like kube-controller-manager, act shortly after the triggering write (real: ms to 100s of ms).
        loop.call_later(GC_DELAY, self.sweep)

    def _wake_in(self, delay: float) -> None:
        """One sweep after `delay` s (for a namespace whose controller pass is due then)."""
        if self.woken:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self.woken = True

        def wake() -> None:
            self.woken = False
            self.schedule()

        loop.call_later(delay, wake)

    def _type(self, storage: str) -> ResourceType | None:
        for rt in self.cluster.types.values():
            if rt.storage == storage and not rt.group == "events.k8s.io":
                return rt
        return None

    def _alive(self, uid: str) -> Obj | None:
        ref = self.uids.get(uid)
        return self.cluster.store.get(ref[0], ref[1], ref[2]) if ref else None

    def sweep(self) -> None:
        self.scheduled = False
        store = self.cluster.store
        for _ in range(50):  # bounded: each pass may unblock the next (foreground chains, namespaces)
            changed = False
            for ref in list(self.owned):
                obj = store.get(*ref)
                if obj is None:
                    self.owned.discard(ref)
                    continue
                owners = obj["metadata"].get("ownerReferences") or []
                states = [self._alive(o.get("uid", "")) for o in owners]
                orphaning = [
                    o
                    for o, s in zip(owners, states, strict=True)
                    if s is not None and "orphan" in (s["metadata"].get("finalizers") or [])
                ]
                if orphaning:
                    keep = [o for o in owners if o not in orphaning]
                    changed |= self._set_meta(ref, obj, ownerReferences=keep or None)
                    continue
                gone = all(s is None for s in states)
                fg = any(
                    s is not None and "foregroundDeletion" in (s["metadata"].get("finalizers") or [])
                    for s in states
                )
                if (gone or fg) and not obj["metadata"].get("deletionTimestamp"):
                    changed |= self._delete(ref, obj)
            for ref in list(self.pending):
                obj = store.get(*ref)
                if obj is None:
                    self.pending.discard(ref)
                    continue
                changed |= self._finish(ref, obj)
            if not changed:
                break

    def _dependents(self, uid: str) -> list[Ref]:
        out = []
        for ref in self.owned:
            obj = self.cluster.store.get(*ref)
            if obj and any(o.get("uid") == uid for o in obj["metadata"].get("ownerReferences") or []):
                out.append(ref)
        return out

    def _finish(self, ref: Ref, obj: Obj) -> bool:
        """Advance an object that is being deleted: orphan/foreground finalizers, namespaces."""
        meta = obj["metadata"]
        fins = list(meta.get("finalizers") or [])
        if ref[0] == "/namespaces":
            return self._finish_namespace(ref, obj)
        if "orphan" in fins and not self._dependents(meta.get("uid", "")):
            fins.remove("orphan")
            return self._set_meta(ref, obj, finalizers=fins or None)
        if "foregroundDeletion" in fins and not self._dependents(meta.get("uid", "")):
            fins.remove("foregroundDeletion")
            return self._set_meta(ref, obj, finalizers=fins or None)
        return False

    def _finish_namespace(self, ref: Ref, ns_obj: Obj) -> bool:
        ns = ns_obj["metadata"]["name"]
        wait = self.terminating.setdefault(ns, time.monotonic()) + NAMESPACE_DELAY - time.monotonic()
        if wait > 0:
            self._wake_in(wait)
            return False
        store = self.cluster.store
        changed = False
        remaining = 0
        with_finalizers = 0
        for storage, bucket in list(store.objects.items()):
            if storage == "/namespaces":
                continue
            for (ons, name), obj in list(bucket.items()):
                if ons != ns:
                    continue
                remaining += 1
                if obj["metadata"].get("finalizers"):
                    with_finalizers += 1
                if not obj["metadata"].get("deletionTimestamp"):
                    changed |= self._delete((storage, ons, name), obj)
        if remaining == 0:
            new = {**ns_obj, "spec": {**(ns_obj.get("spec") or {}), "finalizers": []}}
            store.delete("/namespaces", new)
            return True
        if with_finalizers and not any(
            c.get("type") == "NamespaceFinalizersRemaining"
            for c in (ns_obj.get("status") or {}).get("conditions", [])
        ):
            from loraplane.localkube.cluster import now

            t = now()
            conds = [
                {
                    "type": "NamespaceContentRemaining",
                    "status": "True",
                    "lastTransitionTime": t,
                    "reason": "SomeResourcesRemain",
                    "message": f"Some resources are remaining: {remaining} objects",
                },
                {
                    "type": "NamespaceFinalizersRemaining",
                    "status": "True",
                    "lastTransitionTime": t,
                    "reason": "SomeFinalizersRemain",
                    "message": f"Some content in the namespace has finalizers "
                    f"remaining: {with_finalizers} objects",
                },
            ]
            new = {**ns_obj, "status": {**(ns_obj.get("status") or {}), "conditions": conds}}
            new["metadata"] = {**ns_obj["metadata"], "resourceVersion": str(store.next_rv())}
            store.write("/namespaces", new, ns_obj)
            changed = True
        return changed

    def _delete(self, ref: Ref, obj: Obj) -> bool:
        rt = self._type(ref[0])
        if rt is None:
            return False
        try:
            self.cluster.delete(rt, ref[1], ref[2], {"propagationPolicy": "Background"})
        except ApiError:
            return False
        return True

    def _set_meta(self, ref: Ref, obj: Obj, **changes: Any) -> bool:
        rt = self._type(ref[0])
        if rt is None:
            return False
        meta = dict(obj["metadata"])
        for k, v in changes.items():
            if v is None:
                meta.pop(k, None)
            else:
                meta[k] = v
        body = {**obj, "metadata": meta}
        try:
            self.cluster.update(rt, ref[1], ref[2], body, check_rv=False, validation="Ignore")
        except ApiError:
            return False
        return True
