"""The API semantics independent of HTTP: create, update, patch, delete, with kube-apiserver's rules.

resourceVersion from one counter, generation on spec changes only, the status subresource split,
optimistic concurrency, finalizers and deletionTimestamp, no-op writes that keep the RV, dryRun.
"""

from __future__ import annotations

import asyncio
import json
import random
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from loraplane.localkube import admission, builtins, policies, schema, status
from loraplane.localkube.gc import GarbageCollector
from loraplane.localkube.patches import json_patch, merge_patch, strategic_merge_patch
from loraplane.localkube.resources import ResourceType, builtin_types, crd_types
from loraplane.localkube.status import ApiError
from loraplane.localkube.store import Obj, Store

SYSTEM_META = ("uid", "creationTimestamp", "generation", "deletionTimestamp", "deletionGracePeriodSeconds")
_SUFFIX = "bcdfghjklmnpqrstvwxz2456789"


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _has_generation(rt: ResourceType) -> bool:
    return rt.custom or rt.group in (
        "apps",
        "batch",
        "autoscaling",
        "apiextensions.k8s.io",
        "policy",
        "networking.k8s.io",
    )


def _without(obj: Obj, *keys: str) -> Obj:
    return {k: v for k, v in obj.items() if k not in keys}


class Cluster:
    """Resource types, the store, and the write semantics."""

    def __init__(self, history: int | None = None) -> None:
        self.store = Store() if history is None else Store(history)
        self.types: dict[tuple[str, str, str], ResourceType] = {}
        for rt in builtin_types():
            self.types[(rt.group, rt.version, rt.plural)] = rt
        self.generation = 0  # bumped whenever the set of types changes (discovery ETags)
        self.types_changed_at = datetime.now(UTC)
        self.index_served_at: datetime | None = None  # Last-Modified of the /openapi/v3 index last served
        self.gc = GarbageCollector(self)
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.create(self.type("", "v1", "namespaces"), "", {"metadata": {"name": ns}})
        # The watch history starts after bootstrap, so RV=1 is already too old, as on a real cluster.
        self.store.history.clear()
        self.store.compacted_rv = self.store.rv

    # -- types ---------------------------------------------------------------------------------------
    def type(self, group: str, version: str, plural: str) -> ResourceType:
        return self.types[(group, version, plural)]

    def find_type(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self.types.get((group, version, plural))

    def register_crd(self, crd: Obj) -> None:
        spec = crd.get("spec") or {}
        group, plural = spec.get("group", ""), (spec.get("names") or {}).get("plural", "")
        for key in [k for k, rt in self.types.items() if rt.custom and k[0] == group and k[2] == plural]:
            del self.types[key]
        if crd["metadata"].get("_gone"):
            return
        for rt in crd_types(crd):
            self.types[(rt.group, rt.version, rt.plural)] = rt
        self._types_changed()

    def unregister_crd(self, crd: Obj) -> None:
        spec = crd.get("spec") or {}
        group, plural = spec.get("group", ""), (spec.get("names") or {}).get("plural", "")
        for key in [k for k, rt in self.types.items() if rt.custom and k[0] == group and k[2] == plural]:
            rt = self.types.pop(key)
            for obj in list(self.store.items(rt.storage)):
                self.store.delete(rt.storage, obj)
        self._types_changed()

    def _types_changed(self) -> None:
        self.generation += 1
        changed = datetime.now(UTC)
        # Last-Modified has whole seconds: a change in the second an index was served must still move it,
        # or a client that cached that index (kubectl apply) gets 304 and misses the new type.
        if self.index_served_at is not None and changed < self.index_served_at + timedelta(seconds=1):
            changed = self.index_served_at + timedelta(seconds=1)
        self.types_changed_at = changed

    # -- helpers -------------------------------------------------------------------------------------
    def get(self, rt: ResourceType, ns: str, name: str) -> Obj:
        obj = self.store.get(rt.storage, ns if rt.namespaced else "", name)
        if obj is None:
            raise status.not_found(rt, name)
        return obj

    def _check_namespace(self, rt: ResourceType, ns: str, name: str) -> None:
        if not rt.namespaced:
            return
        nsobj = self.store.get("/namespaces", "", ns)
        if nsobj is None:
            raise status.not_found(self.type("", "v1", "namespaces"), ns)
        if (nsobj.get("metadata") or {}).get("deletionTimestamp"):
            msg = f"unable to create new content in namespace {ns} because it is being terminated"
            details = status._details(rt, name)
            details["causes"] = [
                {
                    "reason": "NamespaceTerminating",
                    "message": f"namespace {ns} is being terminated",
                    "field": "metadata.namespace",
                }
            ]
            raise ApiError(403, f'{rt.qualified} "{name}" is forbidden: {msg}', "Forbidden", details)

    # -- writes --------------------------------------------------------------------------------------
    def create(
        self, rt: ResourceType, ns: str, body: Obj, dry_run: bool = False, validation: str = "Warn"
    ) -> tuple[Obj, list[str]]:
        if not isinstance(body, dict):
            raise ApiError(400, f"the object provided is unrecognized (must be of type {rt.kind})")
        meta = dict(body.get("metadata") or {})
        name = meta.get("name") or ""
        admission.check_type_meta(rt, body, name)
        if rt.namespaced:
            if meta.get("namespace") and meta["namespace"] != ns:
                raise ApiError(
                    400,
                    "the namespace of the provided object does not match the namespace sent on the request",
                )
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        if not name and meta.get("generateName"):
            for _ in range(20):
                name = meta["generateName"] + "".join(random.choice(_SUFFIX) for _ in range(5))
                if self.store.get(rt.storage, ns if rt.namespaced else "", name) is None:
                    break
            meta["name"] = name
        for k in (*SYSTEM_META, "resourceVersion", "managedFields", "selfLink"):
            meta.pop(k, None)
        obj = {
            "apiVersion": rt.api_version,
            "kind": rt.kind,
            "metadata": meta,
            **_without(body, "apiVersion", "kind", "metadata"),
        }
        if rt.status_subresource and rt.plural != "namespaces":
            obj.pop("status", None)  # main-resource writes never set status, on create either
        obj = builtins.on_create(self, rt, obj)
        obj, warnings = admission.admit(rt, obj, None, validation)
        self._check_namespace(rt, ns, name)
        warnings += policies.check(self, rt, "CREATE", obj, None, dry_run=dry_run)
        if self.store.get(rt.storage, meta.get("namespace", ""), name) is not None:
            raise status.already_exists(rt, name)
        meta = obj["metadata"]
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now()
        if _has_generation(rt):
            meta["generation"] = 1
        obj["metadata"] = {k: meta[k] for k in _meta_order(meta)}
        if dry_run:
            return obj, warnings
        _check_storage_size(obj)
        obj["metadata"]["resourceVersion"] = str(self.store.next_rv())
        stored = builtins.to_storage(rt, obj)
        self.store.write(rt.storage, stored, None)
        if rt.plural == "customresourcedefinitions":
            self.register_crd(stored)
            self._later(lambda: self._establish(rt, stored["metadata"]["name"]))
        return obj, warnings

    def _later(self, fn: Callable[[], None]) -> None:
        """Run fn after the current request, as a controller would; at once outside the loop."""
        try:
            asyncio.get_running_loop().call_soon(fn)
        except RuntimeError:
            fn()

    def _establish(self, rt: ResourceType, name: str) -> None:
        """The CRD controller's part: names accepted and Established (kube-apiserver takes milliseconds)."""
        current = self.store.get(rt.storage, "", name)
        if current is None or (current.get("status") or {}).get("conditions"):
            return
        new = {**current, "status": builtins.crd_status(current)}
        new["metadata"] = {**current["metadata"], "resourceVersion": str(self.store.next_rv())}
        self.store.write(rt.storage, new, current)

    def update(
        self,
        rt: ResourceType,
        ns: str,
        name: str,
        body: Obj,
        subresource: str = "",
        dry_run: bool = False,
        validation: str = "Warn",
        check_rv: bool = True,
    ) -> tuple[Obj, list[str]]:
        if not isinstance(body, dict):
            raise ApiError(400, f"the object provided is unrecognized (must be of type {rt.kind})")
        bmeta = body.get("metadata") or {}
        if bmeta.get("name") and bmeta["name"] != name:
            raise ApiError(
                400, f"the name of the object ({bmeta['name']}) does not match the name on the URL ({name})"
            )
        if rt.namespaced and bmeta.get("namespace") and bmeta["namespace"] != ns:
            raise ApiError(
                400, "the namespace of the provided object does not match the namespace sent on the request"
            )
        admission.check_type_meta(rt, body, name)
        current = builtins.from_storage(rt, self.get(rt, ns, name))
        rv = bmeta.get("resourceVersion")
        if check_rv:
            if rv in (None, "") and rt.custom:
                cause = {
                    "reason": "FieldValueInvalid",
                    "message": "Invalid value: 0: must be specified for an update",
                    "field": "metadata.resourceVersion",
                }
                raise status.invalid(rt, name, [cause], kind=rt.plural) from None
            if rv not in (None, ""):
                if not str(rv).isdigit():
                    raise ApiError(500, f'strconv.ParseUint: parsing "{rv}": invalid syntax', None)
                if str(rv) != current["metadata"]["resourceVersion"]:
                    raise status.conflict(rt, name)
        cmeta = current["metadata"]
        if subresource == "status":
            new = {**current}
            if "status" in body:
                new["status"] = body["status"]
            else:
                new.pop("status", None)
        else:
            meta = {k: v for k, v in bmeta.items() if k not in (*SYSTEM_META, "managedFields", "selfLink")}
            for k in (*SYSTEM_META, "namespace", "name"):
                if k in cmeta:
                    meta[k] = cmeta[k]
            new = {
                "apiVersion": rt.api_version,
                "kind": rt.kind,
                "metadata": {k: meta[k] for k in _meta_order(meta)},
                **_without(body, "apiVersion", "kind", "metadata"),
            }
            if rt.status_subresource:
                if "status" in current:
                    new["status"] = current["status"]
                else:
                    new.pop("status", None)
            new = builtins.on_update(self, rt, new, current)
        new["metadata"] = {**new["metadata"], "resourceVersion": cmeta["resourceVersion"]}
        new, warnings = admission.admit(rt, new, current, validation)
        if new == current:
            return current, warnings
        warnings += policies.check(self, rt, "UPDATE", new, current, subresource, dry_run)
        # Without a status subresource, status is ordinary content and bumps generation too.
        content = ("metadata", "status") if rt.status_subresource else ("metadata",)
        if _has_generation(rt) and _without(new, *content) != _without(current, *content):
            new["metadata"]["generation"] = cmeta.get("generation", 0) + 1
        if dry_run:
            return new, warnings
        _check_storage_size(new)
        if new["metadata"].get("deletionTimestamp") and not new["metadata"].get("finalizers"):
            # The last finalizer went: the object is deleted by this write (one DELETED event, no MODIFIED);
            # the answer is its final state with the RV it had.
            self._remove(rt, builtins.to_storage(rt, new))
            return new, warnings
        new["metadata"]["resourceVersion"] = str(self.store.next_rv())
        stored = builtins.to_storage(rt, new)
        self.store.write(rt.storage, stored, builtins.to_storage(rt, current))
        if rt.plural == "customresourcedefinitions":
            self.register_crd(stored)
        return new, warnings

    def patch(
        self,
        rt: ResourceType,
        ns: str,
        name: str,
        ctype: str,
        patch: Any,
        subresource: str = "",
        dry_run: bool = False,
        validation: str = "Warn",
    ) -> tuple[Obj, list[str]]:
        current = builtins.from_storage(rt, self.get(rt, ns, name))
        if ctype == "application/json-patch+json":
            new = json_patch(current, patch)
        else:
            if not isinstance(patch, dict):
                kind = "array" if isinstance(patch, list) else type(patch).__name__
                raise ApiError(
                    400,
                    f"error decoding patch: json: cannot unmarshal {kind} into Go value of type "
                    "map[string]interface {}",
                )
            if ctype == "application/strategic-merge-patch+json":
                new = strategic_merge_patch(current, patch)
            else:
                new = merge_patch(current, patch)
        rv = (new.get("metadata") or {}).get("resourceVersion")
        if rv not in (None, "") and str(rv) != current["metadata"]["resourceVersion"]:
            raise status.conflict(rt, name)
        new.setdefault("metadata", {})["resourceVersion"] = current["metadata"]["resourceVersion"]
        new["metadata"]["name"] = name
        if validation == "Strict" and rt.custom and rt.schema is not None:
            unknown = schema.unknown_fields(rt.schema, new)
            if unknown:
                raise schema.strict_patch_error(new, unknown)
        return self.update(rt, ns, name, new, subresource, dry_run, validation, check_rv=False)

    def delete(
        self, rt: ResourceType, ns: str, name: str, opts: Obj, dry_run: bool = False
    ) -> tuple[Obj, bool]:
        """Returns (object or final state, gone)."""
        policy = opts.get("propagationPolicy")
        if policy not in (None, "Foreground", "Background", "Orphan"):
            raise status.options_invalid(
                "DeleteOptions",
                [
                    {
                        "reason": "FieldValueNotSupported",
                        "field": "propagationPolicy",
                        "message": f'Unsupported value: "{policy}": supported values: "Foreground", "Background", '
                        '"Orphan", "nil"',
                    }
                ],
            )
        stored = self.get(rt, ns, name)
        meta = stored["metadata"]
        pre = opts.get("preconditions") or {}
        if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
            raise status.precondition_failed(rt, name, "RV", pre["resourceVersion"], meta["resourceVersion"])
        if pre.get("uid") and pre["uid"] != meta.get("uid"):
            raise status.precondition_failed(rt, name, "UID", pre["uid"], meta.get("uid", ""))
        if opts.get("orphanDependents") is True and policy is None:
            policy = "Orphan"
        finalizers = list(meta.get("finalizers") or [])
        if rt.plural == "namespaces" and not rt.group:
            finalizers = finalizers or []
        extra = {"Foreground": "foregroundDeletion", "Orphan": "orphan"}.get(policy or "")
        if extra and not meta.get("deletionTimestamp") and extra not in finalizers:
            finalizers.append(extra)
        if rt.plural == "namespaces" and not rt.group:
            return self._delete_namespace(rt, stored, dry_run), False
        if not finalizers:
            if dry_run:
                return builtins.from_storage(rt, stored), True
            gone = self._remove(rt, stored)
            return builtins.from_storage(rt, gone), True
        if meta.get("deletionTimestamp"):
            return builtins.from_storage(rt, stored), False
        new_meta = {
            **meta,
            "deletionTimestamp": now(),
            "deletionGracePeriodSeconds": 0,
            "finalizers": finalizers,
        }
        if "generation" in meta:
            new_meta["generation"] = meta["generation"] + 1
        new = {**stored, "metadata": new_meta}
        if dry_run:
            return builtins.from_storage(rt, new), False
        new_meta["resourceVersion"] = str(self.store.next_rv())
        new["metadata"] = {k: new_meta[k] for k in _meta_order(new_meta)}
        self.store.write(rt.storage, new, stored)
        return builtins.from_storage(rt, new), False

    def _delete_namespace(self, rt: ResourceType, stored: Obj, dry_run: bool) -> Obj:
        if stored["metadata"].get("deletionTimestamp") or dry_run:
            return stored
        new = {
            **stored,
            "metadata": {**stored["metadata"], "deletionTimestamp": now()},
            "status": {**(stored.get("status") or {}), "phase": "Terminating"},
        }
        new["metadata"]["resourceVersion"] = str(self.store.next_rv())
        self.store.write(rt.storage, new, stored)
        return new

    def _remove(self, rt: ResourceType, stored: Obj) -> Obj:
        gone = self.store.delete(rt.storage, stored)
        if rt.plural == "customresourcedefinitions":
            self.unregister_crd(stored)
        return gone


ETCD_LIMIT = 1572864  # etcd's default request limit (1.5 MiB): larger objects fail in storage


def _check_storage_size(obj: Obj) -> None:
    if len(json.dumps(obj, separators=(",", ":"))) > ETCD_LIMIT:
        raise ApiError(500, "etcdserver: request is too large", None)


_META_ORDER = (
    "name",
    "generateName",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "labels",
    "annotations",
    "ownerReferences",
    "finalizers",
)


def _meta_order(meta: Obj) -> list[str]:
    """kube-apiserver's metadata key order, so replies read like the real ones."""
    keys = [k for k in _META_ORDER if k in meta]
    return keys + [k for k in meta if k not in _META_ORDER]


__all__ = ["Cluster", "now"]
