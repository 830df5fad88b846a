"""The aiohttp application: routing, auth and audit, body decoding, content negotiation, writes.

Paths, status codes, Status bodies and headers follow kube-apiserver (see docs/localkube.md for the
differences kept). Reads and watches live in reads.py; semantics of writes in cluster.py.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import yaml
from aiohttp import web

from loraplane.localkube import discovery, proto, rbac, reads, status, tables
from loraplane.localkube.cluster import Cluster
from loraplane.localkube.resources import ResourceType
from loraplane.localkube.status import ApiError

log = logging.getLogger(__name__)
MAX_BODY = 3 * 1024 * 1024
AUDIT_LIMIT = 100_000  # requests kept in ApiState.audit_log; the oldest half goes when it is full
DISCOVERY_V2 = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"
TABLE_CT = "application/json;as=Table;v=v1;g=meta.k8s.io"
BODY_415 = (
    "the body of the request was in an unknown format - accepted media types include: application/json, "
    "application/yaml, application/vnd.kubernetes.protobuf"
)
PATCH_415 = (
    "the body of the request was in an unknown format - accepted media types include: "
    "application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
)
PATCH_TYPES = (
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/apply-patch+yaml",
    "application/strategic-merge-patch+json",
)


@dataclass(slots=True)
class AuditEntry:
    """One request as an authorizer sees it (Kubernetes verb names)."""

    user: str
    verb: str
    api_group: str
    resource: str
    subresource: str
    namespace: str
    name: str
    code: int = 0


@dataclass
class ApiState:
    cluster: Cluster
    tokens: dict[str, str] | None = None
    audit_log: list[AuditEntry] = field(default_factory=list)
    # kube-apiserver's --authorization-mode: "AlwaysAllow" (the default here) or "RBAC".
    authorization: str = "AlwaysAllow"


def _plain404() -> web.Response:
    return web.Response(status=404, text="404 page not found\n", content_type="text/plain", charset="utf-8")


def _json(body: Any, code: int = 200, ctype: str = "application/json", headers: Any = None) -> web.Response:
    data = json.dumps(body, separators=(",", ":")).encode()
    resp = web.Response(status=code, body=data, headers=headers)
    resp.content_type = ctype
    return resp


def _error(e: ApiError) -> web.Response:
    resp = _json(e.body(), e.code)
    for k, v in e.headers.items():
        resp.headers[k] = v
    for w in e.warnings:
        resp.headers.add("Warning", '299 - "' + w.replace('"', '\\"') + '"')
    return resp


def _etagged(request: web.Request, body: Any, ctype: str) -> web.Response:
    data = json.dumps(body, separators=(",", ":")).encode()
    tag = discovery.etag_of(data)
    if request.headers.get("If-None-Match") == tag:
        return web.Response(status=304, headers={"ETag": tag})
    resp = web.Response(status=200, body=data, headers={"ETag": tag})
    resp.content_type = ctype.split(";")[0]
    if ";" in ctype:
        resp.headers["Content-Type"] = ctype
    return resp


def _dup_hook(dups: list[tuple[dict[str, Any], str]]) -> Any:
    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                dups.append((out, k))
            out[k] = v
        return out

    return hook


def _path_of(tree: Any, target: dict[str, Any], prefix: str = "") -> str | None:
    if tree is target:
        return prefix
    if isinstance(tree, dict):
        for k, v in tree.items():
            found = _path_of(v, target, f"{prefix}.{k}" if prefix else k)
            if found is not None:
                return found
    return None


def decode(body: bytes, ctype: str, kind: str, version: str) -> tuple[Any, list[str]]:
    """JSON (also without Content-Type) or YAML; returns (value, duplicate field paths)."""
    if not body:
        return None, []
    if "yaml" in ctype:
        try:
            return yaml.safe_load(body.decode()), []
        except yaml.YAMLError as e:
            raise ApiError(400, f"error converting YAML to JSON: {e}") from None
    dups: list[tuple[dict[str, Any], str]] = []
    try:
        value = json.loads(body, object_pairs_hook=_dup_hook(dups))
    except ValueError:
        snippet = body[:30].decode(errors="replace")
        raise ApiError(
            400,
            f"the object provided is unrecognized (must be of type {kind}): couldn't get "
            f"version/kind; json parse error: unexpected end of JSON input ({snippet} ...)",
        ) from None
    paths = []
    for parent, key in dups:
        p = _path_of(value, parent)
        paths.append(f"{p}.{key}" if p else key)
    return value, paths


def _verb(method: str, name: str, watch: bool) -> str:
    if method == "GET":
        return "get" if name else ("watch" if watch else "list")
    return {
        "POST": "create",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete" if name else "deletecollection",
    }.get(method, method.lower())


def _selected_name(selector: str) -> str:
    """X of a field selector `metadata.name=X` (alone), else ""."""
    key, _, value = selector.partition("=")
    value = value.removeprefix("=")
    return value if key.strip() == "metadata.name" and value and "," not in value else ""


def _user(state: ApiState, request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Bearer ") and state.tokens is not None:
        user = state.tokens.get(auth[7:])
        if user is None:
            raise ApiError(401, "Unauthorized", "Unauthorized")
        return user
    return "admin"


class Api:
    """Request handlers bound to one ApiState."""

    def __init__(self, state: ApiState) -> None:
        self.state = state
        self.cluster = state.cluster
        self.authorizer = rbac.Authorizer(state.cluster)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            return await self._route(request)
        except ApiError as e:
            return _error(e)
        except web.HTTPException:
            raise
        except Exception as e:  # a bug here must reach the client as a Status, and the log with a trace
            log.exception("localkube: %s %s failed", request.method, request.path_qs)
            return _error(ApiError(500, f"Internal error occurred: {type(e).__name__}: {e}", "InternalError"))

    async def _route(self, request: web.Request) -> web.StreamResponse:
        path = request.path.rstrip("/") or "/"
        parts = [p for p in path.split("/") if p]
        if path in ("/healthz", "/readyz", "/livez"):
            return web.Response(text="ok", content_type="text/plain", charset="utf-8")
        if path == "/version":
            return _json(discovery.VERSION)
        if parts and parts[0] == "openapi":
            return self._openapi(request, parts)
        accept = request.headers.get("Accept", "")
        if path in ("/api", "/apis"):
            core = path == "/api"
            if "as=APIGroupDiscoveryList" in accept and "v=v2;" in accept + ";":
                return _etagged(request, discovery.aggregated(self.cluster, core), DISCOVERY_V2)
            if "as=APIGroupDiscoveryList" in accept and "application/json," not in accept + ",":
                raise ApiError(
                    406,
                    "only the following media types are accepted: application/json, "
                    "application/yaml, application/vnd.kubernetes.protobuf",
                )
            return _json(discovery.api_versions() if core else discovery.group_list(self.cluster))
        if parts[0] == "api" and len(parts) >= 2:
            group, version, rest = "", parts[1], parts[2:]
        elif parts[0] == "apis" and len(parts) >= 2:
            if len(parts) == 2:
                doc = discovery.group_doc(self.cluster, parts[1])
                return _json(doc) if doc else _plain404()
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            return _plain404()
        if not rest:
            doc = discovery.resource_list(self.cluster, group, version)
            return _json(doc) if doc else _plain404()
        watch = False
        if rest[0] == "watch":
            watch, rest = True, rest[1:]
        ns: str | None = None
        if (
            rest
            and rest[0] == "namespaces"
            and len(rest) >= 3
            and not (not group and len(rest) == 3 and rest[2] in ("status", "finalize"))
        ):
            ns, rest = rest[1], rest[2:]
        if not rest or len(rest) > 3:
            return _plain404()
        rt = self.cluster.find_type(group, version, rest[0])
        if rt is None:
            return _plain404()
        name = rest[1] if len(rest) > 1 else ""
        sub = rest[2] if len(rest) > 2 else ""
        token = sub == "token" and rt.plural == "serviceaccounts" and not rt.group
        if sub and not (sub == "status" and rt.status_subresource) and sub != "finalize" and not token:
            return _plain404()
        if not rt.namespaced and ns is not None:
            return _plain404()
        if rt.namespaced and ns is None and name:
            return _plain404()
        watch = watch or request.query.get("watch") in ("true", "1")
        verb = _verb(request.method, name, watch)
        # A list or watch of one object by field selector is authorized (and audited) by that name.
        selected = _selected_name(request.query.get("fieldSelector", "")) if verb in ("list", "watch") else ""
        entry = AuditEntry(
            _user(self.state, request), verb, group, rt.plural, sub, ns or "", name or selected
        )
        self.state.audit_log.append(entry)
        if len(self.state.audit_log) > AUDIT_LIMIT:  # a long demo or benchmark must not grow without bound
            del self.state.audit_log[: AUDIT_LIMIT // 2]
        try:
            if self.state.authorization == "RBAC":
                attrs = rbac.Attributes(verb, group, rt.plural, sub, ns or "", name or selected)
                allowed, _ = self.authorizer.authorize(rbac.User.of(entry.user), attrs)
                if not allowed:
                    raise rbac.forbidden(entry.user, attrs)
            if rt.group in ("authorization.k8s.io", "authentication.k8s.io") or token:
                resp = await self._create_only(request, rt, ns or "", name, entry.user)
            else:
                resp = await self._resource(request, rt, ns, name, sub, watch)
        except ApiError as e:
            entry.code = e.code
            raise
        entry.code = resp.status
        return resp

    async def _create_only(
        self, request: web.Request, rt: ResourceType, ns: str, name: str, user: str
    ) -> web.Response:
        """The reviews and TokenRequest: answered from rbac.py, nothing stored."""
        if request.method != "POST":
            raise ApiError(
                405, "the server does not allow this method on the requested resource", "MethodNotAllowed"
            )
        body, _, _ = await self._body(request, rt)
        if rt.plural == "serviceaccounts":
            sa = self.cluster.get(rt, ns, name)
            if self.state.tokens is None:
                self.state.tokens = {}
            return self._reply(request, rbac.token_request(self.state.tokens, sa, body), 201)
        return self._reply(request, rbac.review(self.authorizer, user, rt.plural, ns, body), 201)

    def _openapi(self, request: web.Request, parts: list[str]) -> web.Response:
        if parts == ["openapi", "v2"]:
            return _etagged(request, discovery.openapi_v2(self.cluster), "application/json")
        if parts == ["openapi", "v3"]:
            # Served like Go's http.ServeContent: Last-Modified / If-Modified-Since, sniffed as text/plain.
            changed = self.cluster.types_changed_at.replace(microsecond=0)
            self.cluster.index_served_at = changed
            since = request.if_modified_since
            if since is not None and changed <= since:
                return web.Response(status=304)
            body = json.dumps(discovery.openapi_v3_index(self.cluster), separators=(",", ":")).encode()
            resp = web.Response(status=200, body=body)
            resp.headers["Content-Type"] = "text/plain; charset=utf-8"
            resp.last_modified = changed
            return resp
        if len(parts) == 4 and parts[2] == "api":
            doc = discovery.openapi_v3_gv(self.cluster, "", parts[3])
        elif len(parts) == 5 and parts[2] == "apis":
            doc = discovery.openapi_v3_gv(self.cluster, parts[3], parts[4])
        else:
            doc = None
        return _etagged(request, doc, "application/json") if doc else _plain404()

    async def _body(self, request: web.Request, rt: ResourceType) -> tuple[Any, list[str], str]:
        raw = await request.read()
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"Request entity too large: limit is {MAX_BODY}", "RequestEntityTooLarge")
        ctype = (request.headers.get("Content-Type") or "application/json").split(";")[0].strip()
        if ctype == "application/vnd.kubernetes.protobuf" and not rt.custom:
            try:
                return proto.decode(raw), [], ctype
            except proto.ProtoError:
                raise ApiError(415, BODY_415, "UnsupportedMediaType") from None
        if request.method != "PATCH" and ctype not in ("application/json", "application/yaml", "*/*"):
            raise ApiError(415, BODY_415, "UnsupportedMediaType")
        value, dups = decode(raw, ctype, rt.kind, rt.version)
        return value, dups, ctype

    async def _resource(
        self, request: web.Request, rt: ResourceType, ns: str | None, name: str, sub: str, watch: bool
    ) -> web.StreamResponse:
        q = request.query
        accept = request.headers.get("Accept", "")
        as_table = "as=Table" in accept
        if "application/vnd.kubernetes.protobuf" in accept and rt.custom and "json" not in accept:
            err = ApiError(
                406, "only the following media types are accepted: application/json, application/yaml"
            )
            body = proto.encode_status(err.body())  # a protobuf client gets its error in protobuf
            return web.Response(status=406, body=body, content_type="application/vnd.kubernetes.protobuf")
        dry = q.getall("dryRun", [])
        if dry and dry != ["All"]:
            kind = {
                "POST": "CreateOptions",
                "PUT": "UpdateOptions",
                "PATCH": "PatchOptions",
                "DELETE": "DeleteOptions",
            }.get(request.method, "CreateOptions")
            listed = ", ".join(f'"{d}"' for d in dry)
            raise status.options_invalid(
                kind,
                [
                    {
                        "reason": "FieldValueNotSupported",
                        "field": "dryRun",
                        "message": f'Unsupported value: [{listed}]: supported values: "All"',
                    }
                ],
            )
        dry_run = dry == ["All"]
        validation = q.get("fieldValidation", "Warn")
        c = self.cluster
        m = request.method
        if m == "GET":
            if name:
                obj = reads.builtins.from_storage(rt, c.get(rt, ns or "", name))
                if as_table:
                    return _json(
                        tables.table(rt, [obj], obj["metadata"].get("resourceVersion", "")), ctype=TABLE_CT
                    )
                return self._reply(request, obj)
            if watch:
                ctype = TABLE_CT if as_table else "application/json"
                return await reads.WatchStream(c, rt, ns, q, as_table).serve(request, ctype)
            items, meta = await reads.list_objects(c, rt, ns, q)
            if as_table:
                table = tables.table(
                    rt,
                    items,
                    meta["resourceVersion"],
                    cont=meta.get("continue") or None,
                    remaining=meta.get("remainingItemCount"),
                    include_object=q.get("includeObject", "Metadata"),
                )
                return _json(table, ctype=TABLE_CT)
            return self._reply(
                request,
                {"apiVersion": rt.api_version, "items": items, "kind": rt.list_kind, "metadata": meta},
            )
        if m == "POST" and not name:
            body, dups, _ = await self._body(request, rt)
            warnings = self._dups(rt, dups, validation)
            obj, warn = c.create(rt, ns or "", body, dry_run, validation)
            return self._reply(request, obj, 201, warnings + warn)
        if m == "PUT" and name:
            body, dups, _ = await self._body(request, rt)
            warnings = self._dups(rt, dups, validation)
            obj, warn = c.update(rt, ns or "", name, body, sub, dry_run, validation)
            return self._reply(request, obj, 200, warnings + warn)
        if m == "PATCH" and name:
            return await self._patch(request, rt, ns or "", name, sub, dry_run, validation)
        if m == "DELETE":
            return await self._delete(request, rt, ns, name, dry_run)
        raise ApiError(
            405, "the server does not allow this method on the requested resource", "MethodNotAllowed"
        )

    def _dups(self, rt: ResourceType, dups: list[str], validation: str) -> list[str]:
        if not dups:
            return []
        if validation == "Strict":
            msg = ", ".join(f'duplicate field "{d}"' for d in dups)
            raise ApiError(
                400,
                f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: '
                f"strict decoding error: {msg}",
            )
        return [] if validation == "Ignore" else [f'duplicate field "{d}"' for d in dups]

    async def _patch(
        self,
        request: web.Request,
        rt: ResourceType,
        ns: str,
        name: str,
        sub: str,
        dry_run: bool,
        validation: str,
    ) -> web.StreamResponse:
        raw = await request.read()
        if len(raw) > MAX_BODY:
            raise ApiError(413, f"Request entity too large: limit is {MAX_BODY}", "RequestEntityTooLarge")
        ctype = (request.headers.get("Content-Type") or "").split(";")[0].strip()
        if ctype not in PATCH_TYPES or (ctype == "application/strategic-merge-patch+json" and rt.custom):
            raise ApiError(415, PATCH_415, "UnsupportedMediaType")
        if ctype == "application/apply-patch+yaml":
            if not request.query.get("fieldManager"):
                raise status.options_invalid(
                    "PatchOptions",
                    [
                        {
                            "reason": "FieldValueRequired",
                            "field": "fieldManager",
                            "message": "Required value: is required for apply patch",
                        }
                    ],
                )
            body = yaml.safe_load(raw.decode() or "{}")
            if not isinstance(body, dict) or not body.get("apiVersion") or not body.get("kind"):
                raise ApiError(400, "invalid object type: /, Kind=")
            try:
                c_obj = self.cluster.get(rt, ns, name)
            except ApiError:
                body.setdefault("metadata", {})["name"] = name
                obj, warn = self.cluster.create(rt, ns, body, dry_run, validation)
                return self._reply(request, obj, 201, warn)
            del c_obj
            body.get("metadata", {}).pop("resourceVersion", None)
            obj, warn = self.cluster.patch(
                rt, ns, name, "application/merge-patch+json", body, sub, dry_run, validation
            )
            return self._reply(request, obj, 200, warn)
        patch, _ = decode(raw, "application/json", rt.kind, rt.version)
        obj, warn = self.cluster.patch(rt, ns, name, ctype, patch, sub, dry_run, validation)
        return self._reply(request, obj, 200, warn)

    async def _delete(
        self, request: web.Request, rt: ResourceType, ns: str | None, name: str, dry_run: bool
    ) -> web.StreamResponse:
        raw = await request.read()
        opts: dict[str, Any] = {}
        if raw:
            value, _ = decode(raw, "application/json", "DeleteOptions", "v1")
            opts = value if isinstance(value, dict) else {}
        for key in ("propagationPolicy", "orphanDependents"):
            if key in request.query:
                opts[key] = request.query[key] if key == "propagationPolicy" else request.query[key] == "true"
        if opts.get("dryRun") == ["All"]:
            dry_run = True
        c = self.cluster
        if name:
            obj, gone = c.delete(rt, ns or "", name, opts, dry_run)
            # Like kube-apiserver's pod registry (ReturnDeletedObject): a deleted Pod comes back as the
            # object, which the clients' delete_namespaced_pod deserializes; other kinds get a Status.
            returns_object = rt.plural == "pods" and not rt.group
            return self._reply(request, status.success(rt, obj) if gone and not returns_object else obj)
        items, _ = await reads.list_objects(c, rt, ns, request.query)
        deleted = []
        for obj in items:
            meta = obj["metadata"]
            try:
                out, _gone = c.delete(rt, meta.get("namespace", ""), meta["name"], opts, dry_run)
            except ApiError:
                continue
            deleted.append(out)
        return self._reply(
            request,
            {
                "apiVersion": rt.api_version,
                "items": deleted,
                "kind": rt.list_kind,
                "metadata": {"resourceVersion": str(c.store.rv), **({"continue": ""} if rt.custom else {})},
            },
        )

    def _reply(
        self, request: web.Request, body: Any, code: int = 200, warnings: list[str] | None = None
    ) -> web.Response:
        accept = request.headers.get("Accept", "")
        if accept.startswith("application/yaml"):
            resp = web.Response(
                status=code, text=yaml.safe_dump(body, sort_keys=True), content_type="application/yaml"
            )
        else:
            resp = _json(body, code)
        for w in warnings or []:
            resp.headers.add("Warning", '299 - "' + w.replace('"', '\\"') + '"')
        return resp


def make_app(state: ApiState) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY * 2)
    api = Api(state)
    app.router.add_route("*", "/{tail:.*}", api.handle)
    return app
