"""RBAC: kube-apiserver's authorizer over the stored Roles, ClusterRoles and their bindings.

Enforced when the server runs with authorization="RBAC" (kube-apiserver's --authorization-mode); by
default everything is allowed, as the tests' admin. The answers follow the RBAC authorizer: a request
is allowed by the first binding whose role has a matching rule (verbs, apiGroups, resources with
`resource/subresource` and `*` forms, resourceNames), denied with kube-apiserver's 403 otherwise.
SubjectAccessReview, LocalSubjectAccessReview, SelfSubjectAccessReview and SelfSubjectRulesReview
are answered from the same rules, and SelfSubjectReview says who the caller is. A TokenRequest on a
ServiceAccount issues a bearer token for `system:serviceaccount:<ns>:<name>`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from loraplane.localkube.status import ApiError

if TYPE_CHECKING:
    from loraplane.localkube.cluster import Cluster

Obj = dict[str, Any]
ADMIN = "admin"  # a request without credentials: system:masters, allowed everything
SA_PREFIX = "system:serviceaccount:"
# Bootstrap policy every authenticated user has (system:basic-user, system:discovery,
# system:public-info-viewer).
AUTHENTICATED_RULES: list[Obj] = [
    {
        "verbs": ["create"],
        "apiGroups": ["authorization.k8s.io"],
        "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
    },
    {"verbs": ["create"], "apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"]},
]
AUTHENTICATED_NON_RESOURCE: list[Obj] = [
    {
        "verbs": ["get"],
        "nonResourceURLs": [
            "/api",
            "/api/*",
            "/apis",
            "/apis/*",
            "/healthz",
            "/livez",
            "/openapi",
            "/openapi/*",
            "/readyz",
            "/version",
            "/version/",
        ],
    },
]


@dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @staticmethod
    def of(name: str) -> User:
        if name == ADMIN:
            return User(name, ("system:masters", "system:authenticated"))
        if name.startswith(SA_PREFIX):
            ns = name[len(SA_PREFIX) :].split(":", 1)[0]
            groups = ("system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated")
            return User(name, groups)
        return User(name, ("system:authenticated",))


@dataclass(frozen=True)
class Attributes:
    """One request as the authorizer sees it (kube-apiserver's RequestInfo)."""

    verb: str
    group: str
    resource: str
    subresource: str = ""
    namespace: str = ""
    name: str = ""


def _covers(values: list[str], want: str) -> bool:
    return "*" in values or want in values


def _rule_allows(rule: Obj, a: Attributes) -> bool:
    if not _covers(rule.get("verbs") or [], a.verb) or not _covers(rule.get("apiGroups") or [], a.group):
        return False
    resources = rule.get("resources") or []
    combined = f"{a.resource}/{a.subresource}" if a.subresource else a.resource
    if not (
        "*" in resources
        or combined in resources
        or (a.subresource and (f"*/{a.subresource}" in resources or f"{a.resource}/*" in resources))
    ):
        return False
    names = rule.get("resourceNames") or []
    return not names or a.name in names


def _subject_matches(subject: Obj, user: User, binding_ns: str) -> bool:
    kind, name = subject.get("kind"), subject.get("name", "")
    if kind == "User":
        return name == user.name
    if kind == "Group":
        return name in user.groups
    if kind == "ServiceAccount":
        return user.name == f"{SA_PREFIX}{subject.get('namespace') or binding_ns}:{name}"
    return False


def _describe(subject: Obj, binding_ns: str) -> str:
    if subject.get("kind") == "ServiceAccount":
        return f'ServiceAccount "{subject.get("name")}/{subject.get("namespace") or binding_ns}"'
    return f'{subject.get("kind")} "{subject.get("name")}"'


class Authorizer:
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def _objects(self, plural: str, namespace: str = "") -> list[Obj]:
        rt = self.cluster.type("rbac.authorization.k8s.io", "v1", plural)
        return [
            o
            for o in self.cluster.store.items(rt.storage)
            if not namespace or o["metadata"].get("namespace") == namespace
        ]

    def _role(self, ref: Obj, namespace: str) -> Obj | None:
        kind, name = ref.get("kind"), ref.get("name")
        plural, ns = ("clusterroles", "") if kind == "ClusterRole" else ("roles", namespace)
        rt = self.cluster.type("rbac.authorization.k8s.io", "v1", plural)
        return self.cluster.store.get(rt.storage, ns, name or "")

    def bindings(self, user: User, namespace: str) -> list[tuple[str, Obj, Obj | None, Obj]]:
        """(binding description, binding, its role, the matching subject) that apply to `user`:
        every ClusterRoleBinding, then the RoleBindings of `namespace`."""
        out = []
        sources = [("ClusterRoleBinding", b) for b in self._objects("clusterrolebindings")]
        if namespace:
            sources += [("RoleBinding", b) for b in self._objects("rolebindings", namespace)]
        for kind, b in sources:
            bns = b["metadata"].get("namespace", "")
            for subject in b.get("subjects") or []:
                if _subject_matches(subject, user, bns):
                    role = self._role(b.get("roleRef") or {}, bns)
                    name = (
                        f"{b['metadata']['name']}/{bns}" if kind == "RoleBinding" else b["metadata"]["name"]
                    )
                    out.append((f'{kind} "{name}"', b, role, subject))
                    break
        return out

    def authorize(self, user: User, a: Attributes) -> tuple[bool, str]:
        """(allowed, reason) as the RBAC authorizer gives them."""
        if "system:masters" in user.groups:
            return True, ""
        if "system:authenticated" in user.groups and any(_rule_allows(r, a) for r in AUTHENTICATED_RULES):
            return True, 'RBAC: allowed by ClusterRoleBinding "system:basic-user" of ClusterRole ' + (
                '"system:basic-user" to Group "system:authenticated"'
            )
        for where, b, role, subject in self.bindings(user, a.namespace):
            if role and any(_rule_allows(r, a) for r in role.get("rules") or []):
                ref = b.get("roleRef") or {}
                bns = b["metadata"].get("namespace", "")
                return True, (
                    f'RBAC: allowed by {where} of {ref.get("kind")} "{ref.get("name")}" to {_describe(subject, bns)}'
                )
        return False, ""

    def rules(self, user: User, namespace: str) -> tuple[list[Obj], list[Obj]]:
        """SelfSubjectRulesReview: (resourceRules, nonResourceRules) that apply in `namespace`."""
        resource: list[Obj] = []
        non_resource: list[Obj] = []
        if "system:masters" in user.groups:
            resource.append({"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]})
            non_resource.append({"verbs": ["*"], "nonResourceURLs": ["*"]})
        if "system:authenticated" in user.groups:
            resource += [dict(r) for r in AUTHENTICATED_RULES]
            non_resource += [dict(r) for r in AUTHENTICATED_NON_RESOURCE]
        for _where, _b, role, _s in self.bindings(user, namespace):
            for rule in (role or {}).get("rules") or []:
                if rule.get("nonResourceURLs"):
                    non_resource.append({"verbs": rule["verbs"], "nonResourceURLs": rule["nonResourceURLs"]})
                else:
                    out = {
                        k: rule[k]
                        for k in ("verbs", "apiGroups", "resources", "resourceNames")
                        if rule.get(k)
                    }
                    resource.append(out)
        return resource, non_resource


def forbidden(user: str, a: Attributes) -> ApiError:
    """kube-apiserver's 403 for a request the authorizer denied."""
    resource = f"{a.resource}/{a.subresource}" if a.subresource else a.resource
    where = f'in the namespace "{a.namespace}"' if a.namespace else "at the cluster scope"
    why = f'User "{user}" cannot {a.verb} resource "{resource}" in API group "{a.group}" {where}'
    qualified = f"{a.resource}.{a.group}" if a.group else a.resource
    subject = f'{qualified} "{a.name}"' if a.name else qualified
    # StatusDetails' fields are omitempty: no "group" for the core group, no "name" for a collection.
    details: Obj = {k: v for k, v in (("name", a.name), ("group", a.group), ("kind", a.resource)) if v}
    return ApiError(403, f"{subject} is forbidden: {why}", "Forbidden", details=details)


# -- the review APIs ---------------------------------------------------------------------------------
def _invalid(kind: str, group: str, causes: list[Obj]) -> ApiError:
    text = ", ".join(f"{c['field']}: {c['message']}" for c in causes)
    message = (
        f'{kind}.{group} "" is invalid: {text}'
        if len(causes) == 1
        else f'{kind}.{group} "" is invalid: [{text}]'
    )
    return ApiError(422, message, "Invalid", details={"group": group, "kind": kind, "causes": causes})


def _attributes(spec: Obj, namespace: str | None = None) -> Attributes | None:
    ra = spec.get("resourceAttributes")
    if not isinstance(ra, dict):
        return None
    return Attributes(
        verb=ra.get("verb", ""),
        group=ra.get("group", ""),
        resource=ra.get("resource", ""),
        subresource=ra.get("subresource", ""),
        namespace=namespace if namespace is not None else ra.get("namespace", ""),
        name=ra.get("name", ""),
    )


def review(authorizer: Authorizer, caller: str, plural: str, namespace: str, body: Any) -> Obj:
    """The answer to a create of one of the review kinds (nothing is stored)."""
    body = body if isinstance(body, dict) else {}
    spec = body.get("spec") if isinstance(body.get("spec"), dict) else {}
    kind = {
        "subjectaccessreviews": "SubjectAccessReview",
        "localsubjectaccessreviews": "LocalSubjectAccessReview",
        "selfsubjectaccessreviews": "SelfSubjectAccessReview",
        "selfsubjectrulesreviews": "SelfSubjectRulesReview",
        "selfsubjectreviews": "SelfSubjectReview",
    }[plural]
    group = "authentication.k8s.io" if plural == "selfsubjectreviews" else "authorization.k8s.io"
    meta: Obj = {"creationTimestamp": None}
    if plural == "selfsubjectreviews":
        user = User.of(caller)
        info = {"username": user.name, "groups": list(user.groups)}
        return {"kind": kind, "apiVersion": f"{group}/v1", "metadata": meta, "status": {"userInfo": info}}
    if plural == "selfsubjectrulesreviews":
        resource, non_resource = authorizer.rules(User.of(caller), spec.get("namespace", ""))
        status = {"resourceRules": resource, "nonResourceRules": non_resource, "incomplete": False}
        return {"kind": kind, "apiVersion": f"{group}/v1", "metadata": meta, "spec": spec, "status": status}
    if plural == "selfsubjectaccessreviews":
        user = User.of(caller)
    else:
        if not spec.get("user") and not spec.get("groups"):
            raise _invalid(
                kind,
                group,
                [
                    {
                        "reason": "FieldValueInvalid",
                        "message": 'Invalid value: "": at least one of user or group must be specified',
                        "field": "spec.user",
                    }
                ],
            )
        user = User(spec.get("user", ""), tuple(spec.get("groups") or ()))
    has_ra, has_nra = bool(spec.get("resourceAttributes")), bool(spec.get("nonResourceAttributes"))
    if has_ra == has_nra:
        raise _invalid(
            kind,
            group,
            [
                {
                    "reason": "FieldValueInvalid",
                    "message": 'Invalid value: "": exactly one of nonResourceAttributes or resourceAttributes '
                    "must be specified",
                    "field": "spec.resourceAttributes",
                }
            ],
        )
    if has_nra:
        allowed, reason = "system:authenticated" in user.groups or "system:masters" in user.groups, ""
    else:
        attrs = _attributes(spec, namespace if plural == "localsubjectaccessreviews" else None)
        assert attrs is not None
        allowed, reason = authorizer.authorize(user, attrs)
    status: Obj = {"allowed": allowed}
    if reason:
        status["reason"] = reason
    return {"kind": kind, "apiVersion": f"{group}/v1", "metadata": meta, "spec": spec, "status": status}


def token_request(tokens: dict[str, str], sa: Obj, body: Any) -> Obj:
    """A TokenRequest for a stored ServiceAccount: a fresh bearer token for it."""
    spec = dict((body or {}).get("spec") or {}) if isinstance(body, dict) else {}
    seconds = int(spec.get("expirationSeconds") or 3600)
    spec.setdefault("audiences", ["https://kubernetes.default.svc"])
    spec["expirationSeconds"] = seconds
    spec.setdefault("boundObjectRef", None)
    meta = sa["metadata"]
    token = secrets.token_urlsafe(32)
    tokens[token] = f"{SA_PREFIX}{meta['namespace']}:{meta['name']}"
    expires = (datetime.now(UTC) + timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "creationTimestamp": None},
        "spec": spec,
        "status": {"token": token, "expirationTimestamp": expires},
    }
