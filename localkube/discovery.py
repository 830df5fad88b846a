"""Discovery and OpenAPI documents: what kubectl and kopf read to find resources and their schemas.

/api, /apis (plain and aggregated v2 with ETag/304), per-group and per-group-version lists, /version,
and OpenAPI v2/v3 documents built from the registered types (CRD schemas for custom resources), so
`kubectl apply` finds fieldValidation support and `kubectl explain` finds the fields.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loraplane.localkube.cluster import Cluster
    from loraplane.localkube.resources import ResourceType

Obj = dict[str, Any]
VERSION = {
    "major": "1",
    "minor": "36",
    "emulationMajor": "1",
    "emulationMinor": "36",
    "minCompatibilityMajor": "1",
    "minCompatibilityMinor": "35",
    "gitVersion": "v1.36.2-localkube",
    "gitCommit": "0000000000000000000000000000000000000000",
    "gitTreeState": "clean",
    "buildDate": "2026-11-25T00:00:00Z",
    "goVersion": "go1.27.3",
    "compiler": "gc",
    "platform": "linux/amd64",
}
ETAG_CACHE: dict[tuple[str, int], tuple[str, bytes]] = {}


def etag_of(body: bytes) -> str:
    return '"' + hashlib.sha512(body).hexdigest().upper() + '"'


def groups(cluster: Cluster) -> dict[str, list[str]]:
    """group -> served versions (core group is "")."""
    out: dict[str, list[str]] = {}
    for rt in cluster.types.values():
        versions = out.setdefault(rt.group, [])
        if rt.version not in versions:
            versions.append(rt.version)
    return out


def _types_in(cluster: Cluster, group: str, version: str) -> list[ResourceType]:
    return [rt for rt in cluster.types.values() if rt.group == group and rt.version == version]


def resource_list(cluster: Cluster, group: str, version: str) -> Obj | None:
    types = _types_in(cluster, group, version)
    if not types:
        return None
    resources: list[Obj] = []
    for rt in types:
        entry: Obj = {
            "name": rt.plural,
            "singularName": rt.singular,
            "namespaced": rt.namespaced,
            "kind": rt.kind,
            "verbs": rt.verbs,
        }
        if rt.short_names:
            entry["shortNames"] = rt.short_names
        if rt.categories:
            entry["categories"] = rt.categories
        resources.append(entry)
        if rt.status_subresource:
            resources.append(
                {
                    "name": f"{rt.plural}/status",
                    "singularName": "",
                    "namespaced": rt.namespaced,
                    "kind": rt.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
    if not group:  # the core list has no apiVersion, as kube-apiserver sends it
        return {"kind": "APIResourceList", "groupVersion": version, "resources": resources}
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": f"{group}/{version}",
        "resources": resources,
    }


def _preferred(versions: list[str]) -> str:
    return versions[0]


def group_doc(cluster: Cluster, group: str) -> Obj | None:
    versions = groups(cluster).get(group)
    if not versions or not group:
        return None
    vs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"kind": "APIGroup", "apiVersion": "v1", "name": group, "versions": vs, "preferredVersion": vs[0]}


def api_versions() -> Obj:
    return {
        "kind": "APIVersions",
        "versions": ["v1"],
        "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}],
    }


def group_list(cluster: Cluster) -> Obj:
    out = []
    for group, versions in sorted(groups(cluster).items()):
        if not group:
            continue
        vs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        out.append({"name": group, "versions": vs, "preferredVersion": vs[0]})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": out}


def aggregated(cluster: Cluster, core: bool) -> Obj:
    """apidiscovery.k8s.io/v2 APIGroupDiscoveryList for /api (core) or /apis."""
    items = []
    for group, versions in sorted(groups(cluster).items()):
        if (group == "") != core:
            continue
        vitems = []
        for v in versions:
            res = []
            for rt in _types_in(cluster, group, v):
                kind = {
                    "group": rt.group if rt.custom else "",
                    "version": rt.version if rt.custom else "",
                    "kind": rt.kind,
                }
                e: Obj = {
                    "resource": rt.plural,
                    "responseKind": kind,
                    "scope": "Namespaced" if rt.namespaced else "Cluster",
                    "singularResource": rt.singular,
                    "verbs": rt.verbs,
                }
                if rt.short_names:
                    e["shortNames"] = rt.short_names
                if rt.categories:
                    e["categories"] = rt.categories
                if rt.status_subresource:
                    e["subresources"] = [
                        {"subresource": "status", "responseKind": kind, "verbs": ["get", "patch", "update"]}
                    ]
                res.append(e)
            vitems.append({"version": v, "resources": res, "freshness": "Current"})
        items.append({"metadata": {"name": group} if group else {}, "versions": vitems})
    return {
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    }


# -- OpenAPI -------------------------------------------------------------------------------------------
OBJECT_META = {
    "description": "ObjectMeta is metadata that all persisted resources must have.",
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "Name must be unique within a namespace."},
        "generateName": {"type": "string"},
        "namespace": {"type": "string"},
        "uid": {"type": "string"},
        "resourceVersion": {"type": "string"},
        "generation": {"type": "integer", "format": "int64"},
        "creationTimestamp": {"type": "string", "format": "date-time"},
        "deletionTimestamp": {"type": "string", "format": "date-time"},
        "deletionGracePeriodSeconds": {"type": "integer", "format": "int64"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
        "finalizers": {"type": "array", "items": {"type": "string"}},
        "ownerReferences": {
            "type": "array",
            "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
        "managedFields": {
            "type": "array",
            "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
        },
    },
}
META_REF = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def _reverse_group(group: str) -> str:
    return ".".join(reversed(group.split("."))) if group else "io.k8s.api.core"


def schema_name(rt: ResourceType) -> str:
    return f"{_reverse_group(rt.group)}.{rt.version}.{rt.kind}"


def _type_schema(rt: ResourceType, v3: bool) -> Obj:
    base = (
        json.loads(json.dumps(rt.schema))
        if rt.schema
        else {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    )
    props = base.setdefault("properties", {})
    props["apiVersion"] = {
        "type": "string",
        "description": "APIVersion defines the versioned schema of this representation of an object.",
    }
    props["kind"] = {
        "type": "string",
        "description": "Kind is a string value representing the REST resource this object represents.",
    }
    ref = ("#/components/schemas/" if v3 else "#/definitions/") + META_REF
    props["metadata"] = {"allOf": [{"$ref": ref}]} if v3 else {"$ref": ref}
    base["x-kubernetes-group-version-kind"] = [{"group": rt.group, "version": rt.version, "kind": rt.kind}]
    return base


_PARAMS = [
    {"name": n, "in": "query", "schema": {"type": "string"}}
    for n in ("dryRun", "fieldManager", "fieldValidation", "pretty")
]


def openapi_v3_gv(cluster: Cluster, group: str, version: str) -> Obj | None:
    types = _types_in(cluster, group, version)
    if not types:
        return None
    paths: Obj = {}
    schemas: Obj = {META_REF: OBJECT_META}
    for rt in types:
        prefix = f"/apis/{rt.group}/{rt.version}" if rt.group else f"/api/{rt.version}"
        coll = f"{prefix}/namespaces/{{namespace}}/{rt.plural}" if rt.namespaced else f"{prefix}/{rt.plural}"
        ref = {"$ref": f"#/components/schemas/{schema_name(rt)}"}
        body = {"content": {"application/json": {"schema": ref}}}
        ok = {"200": {"description": "OK", "content": {"application/json": {"schema": ref}}}}
        gvk = {"group": rt.group, "version": rt.version, "kind": rt.kind}
        paths[coll] = {
            "post": {
                "parameters": _PARAMS,
                "requestBody": body,
                "responses": ok,
                "x-kubernetes-group-version-kind": gvk,
                "x-kubernetes-action": "post",
            }
        }
        paths[coll + "/{name}"] = {
            "get": {"responses": ok, "x-kubernetes-action": "get", "x-kubernetes-group-version-kind": gvk},
            "put": {
                "parameters": _PARAMS,
                "requestBody": body,
                "responses": ok,
                "x-kubernetes-action": "put",
                "x-kubernetes-group-version-kind": gvk,
            },
            "patch": {
                "parameters": _PARAMS,
                "responses": ok,
                "x-kubernetes-action": "patch",
                "x-kubernetes-group-version-kind": gvk,
                "requestBody": {"content": {"application/merge-patch+json": {"schema": {"type": "object"}}}},
            },
        }
        schemas[schema_name(rt)] = _type_schema(rt, v3=True)
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.36.2"},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def openapi_v3_index(cluster: Cluster) -> Obj:
    paths = {}
    for group, versions in groups(cluster).items():
        for v in versions:
            doc = openapi_v3_gv(cluster, group, v)
            h = etag_of(json.dumps(doc, sort_keys=True).encode()).strip('"')
            paths[_gv_path(group, v)] = {"serverRelativeURL": f"/openapi/v3/{_gv_path(group, v)}?hash={h}"}
    return {"paths": dict(sorted(paths.items()))}


def openapi_v2(cluster: Cluster) -> Obj:
    defs: Obj = {META_REF: OBJECT_META}
    for rt in cluster.types.values():
        defs[schema_name(rt)] = _type_schema(rt, v3=False)
    return {
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": "v1.36.2"},
        "paths": {},
        "definitions": defs,
    }
