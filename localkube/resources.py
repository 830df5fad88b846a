"""Resource types the server knows: the built-in kinds it stores and the custom kinds CRDs register.

One ResourceType carries everything the HTTP layer, discovery, validation and Table output need, so
the handlers never branch on which kind they serve beyond the few flags here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ALL_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclass
class ResourceType:
    """One served resource (group, version, plural) and how it behaves."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    singular: str = ""
    short_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    verbs: list[str] = field(default_factory=lambda: list(ALL_VERBS))
    status_subresource: bool = False
    # The OpenAPI v3 schema of a custom resource; None for built-ins (not validated).
    schema: dict[str, Any] | None = None
    printer_columns: list[dict[str, Any]] = field(default_factory=list)
    custom: bool = False
    # Field selector labels beyond metadata.name/metadata.namespace.
    field_labels: tuple[str, ...] = ()
    # Storage key shared by several versions/groups of the same objects (core and events.k8s.io Events).
    storage: str = ""

    def __post_init__(self) -> None:
        if not self.singular:
            self.singular = self.kind.lower()
        if not self.storage:
            self.storage = f"{self.group}/{self.plural}"

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

    @property
    def qualified(self) -> str:
        """`widgets.demo.example.com` or `configmaps`: the name kube-apiserver uses in messages."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def kind_qualified(self) -> str:
        """`Widget.demo.example.com` or `Event`: the prefix of Invalid messages."""
        return f"{self.kind}.{self.group}" if self.group else self.kind


def _r(group: str, version: str, plural: str, kind: str, namespaced: bool = True, **kw: Any) -> ResourceType:
    return ResourceType(group=group, version=version, plural=plural, kind=kind, namespaced=namespaced, **kw)


EVENT_FIELDS = (
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
)
EVENTS_K8S_FIELDS = (
    "regarding.kind",
    "regarding.namespace",
    "regarding.name",
    "regarding.uid",
    "regarding.apiVersion",
    "regarding.resourceVersion",
    "regarding.fieldPath",
    "reason",
    "reportingController",
    "type",
)


def builtin_types() -> list[ResourceType]:
    """The built-in kinds: stored and served, not validated beyond what the project relies on."""
    return [
        _r(
            "",
            "v1",
            "namespaces",
            "Namespace",
            False,
            short_names=["ns"],
            status_subresource=True,
            verbs=["create", "delete", "get", "list", "patch", "update", "watch"],
            field_labels=("status.phase",),
        ),
        _r("", "v1", "events", "Event", short_names=["ev"], field_labels=EVENT_FIELDS, storage="events"),
        _r(
            "",
            "v1",
            "pods",
            "Pod",
            short_names=["po"],
            categories=["all"],
            status_subresource=True,
            field_labels=("spec.nodeName", "spec.serviceAccountName", "status.phase", "status.podIP"),
        ),
        _r("", "v1", "serviceaccounts", "ServiceAccount", short_names=["sa"]),
        _r("", "v1", "configmaps", "ConfigMap", short_names=["cm"]),
        _r("", "v1", "secrets", "Secret", field_labels=("type",)),
        _r("", "v1", "services", "Service", short_names=["svc"], categories=["all"], status_subresource=True),
        _r(
            "",
            "v1",
            "persistentvolumeclaims",
            "PersistentVolumeClaim",
            short_names=["pvc"],
            status_subresource=True,
        ),
        _r(
            "apps",
            "v1",
            "deployments",
            "Deployment",
            short_names=["deploy"],
            categories=["all"],
            status_subresource=True,
        ),
        _r(
            "apps",
            "v1",
            "statefulsets",
            "StatefulSet",
            short_names=["sts"],
            categories=["all"],
            status_subresource=True,
        ),
        *_more_builtins(),
        _r(
            "events.k8s.io",
            "v1",
            "events",
            "Event",
            short_names=["ev"],
            field_labels=EVENTS_K8S_FIELDS,
            storage="events",
        ),
        _r("coordination.k8s.io", "v1", "leases", "Lease"),
        _r(
            "apiextensions.k8s.io",
            "v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            False,
            short_names=["crd", "crds"],
            categories=["api-extensions"],
            status_subresource=True,
        ),
        _r("rbac.authorization.k8s.io", "v1", "roles", "Role"),
        _r("rbac.authorization.k8s.io", "v1", "rolebindings", "RoleBinding"),
        _r("rbac.authorization.k8s.io", "v1", "clusterroles", "ClusterRole", False),
        _r("rbac.authorization.k8s.io", "v1", "clusterrolebindings", "ClusterRoleBinding", False),
        _r(
            "admissionregistration.k8s.io",
            "v1",
            "validatingwebhookconfigurations",
            "ValidatingWebhookConfiguration",
            False,
        ),
        _r(
            "admissionregistration.k8s.io",
            "v1",
            "mutatingwebhookconfigurations",
            "MutatingWebhookConfiguration",
            False,
        ),
        # Evaluated on writes (policies.py).
        _r(
            "admissionregistration.k8s.io",
            "v1",
            "validatingadmissionpolicies",
            "ValidatingAdmissionPolicy",
            False,
            status_subresource=True,
        ),
        _r(
            "admissionregistration.k8s.io",
            "v1",
            "validatingadmissionpolicybindings",
            "ValidatingAdmissionPolicyBinding",
            False,
        ),
        _r(
            "policy",
            "v1",
            "poddisruptionbudgets",
            "PodDisruptionBudget",
            short_names=["pdb"],
            status_subresource=True,
        ),
        _r("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", short_names=["netpol"]),
        *_reviews(),
    ]


def _reviews() -> list[ResourceType]:
    """The create-only kinds rbac.py answers (never stored)."""
    create = dict(verbs=["create"])
    return [
        _r("authorization.k8s.io", "v1", "subjectaccessreviews", "SubjectAccessReview", False, **create),
        _r(
            "authorization.k8s.io",
            "v1",
            "selfsubjectaccessreviews",
            "SelfSubjectAccessReview",
            False,
            **create,
        ),
        _r(
            "authorization.k8s.io", "v1", "selfsubjectrulesreviews", "SelfSubjectRulesReview", False, **create
        ),
        _r("authorization.k8s.io", "v1", "localsubjectaccessreviews", "LocalSubjectAccessReview", **create),
        _r("authentication.k8s.io", "v1", "selfsubjectreviews", "SelfSubjectReview", False, **create),
    ]


def _more_builtins() -> list[ResourceType]:
    """Further kinds a rendered chart or a test may apply: stored only."""
    apps = dict(categories=["all"], status_subresource=True)
    return [
        _r("apps", "v1", "daemonsets", "DaemonSet", short_names=["ds"], **apps),
        _r("apps", "v1", "replicasets", "ReplicaSet", short_names=["rs"], **apps),
        _r("batch", "v1", "jobs", "Job", **apps),
        _r("batch", "v1", "cronjobs", "CronJob", short_names=["cj"], **apps),
        _r(
            "autoscaling",
            "v2",
            "horizontalpodautoscalers",
            "HorizontalPodAutoscaler",
            short_names=["hpa"],
            **apps,
        ),
        _r("networking.k8s.io", "v1", "ingresses", "Ingress", short_names=["ing"], status_subresource=True),
        _r("", "v1", "endpoints", "Endpoints", short_names=["ep"]),
        _r("", "v1", "limitranges", "LimitRange", short_names=["limits"]),
        _r("", "v1", "resourcequotas", "ResourceQuota", short_names=["quota"], status_subresource=True),
        _r("", "v1", "nodes", "Node", False, short_names=["no"], status_subresource=True),
        _r(
            "",
            "v1",
            "persistentvolumes",
            "PersistentVolume",
            False,
            short_names=["pv"],
            status_subresource=True,
        ),
        _r("scheduling.k8s.io", "v1", "priorityclasses", "PriorityClass", False, short_names=["pc"]),
        _r("storage.k8s.io", "v1", "storageclasses", "StorageClass", False, short_names=["sc"]),
    ]


def crd_types(crd: dict[str, Any]) -> list[ResourceType]:
    """The served versions of one CRD as ResourceTypes."""
    spec = crd.get("spec") or {}
    names = spec.get("names") or {}
    out = []
    for v in spec.get("versions") or []:
        if not v.get("served", True):
            continue
        out.append(
            ResourceType(
                group=spec.get("group", ""),
                version=v["name"],
                plural=names.get("plural", ""),
                kind=names.get("kind", ""),
                namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                singular=names.get("singular") or names.get("kind", "").lower(),
                short_names=list(names.get("shortNames") or []),
                categories=list(names.get("categories") or []),
                status_subresource="status" in (v.get("subresources") or {}),
                schema=((v.get("schema") or {}).get("openAPIV3Schema")) or {"type": "object"},
                printer_columns=list(v.get("additionalPrinterColumns") or []),
                custom=True,
            )
        )
    return out
