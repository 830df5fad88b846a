"""kube-apiserver's defaulting of the built-in kinds the project, its tests and its chart write.

The values of SetObjectDefaults in k8s.io/kubernetes pkg/apis/{core,apps,networking}/v1/defaults.go:
a field that is absent gets its default on every write, a field that is set is kept. Admission
plugins that change Pods (ServiceAccount, Priority, DefaultTolerationSeconds) and allocators (a
Service's clusterIP) are not modelled (docs/localkube.md).
"""

from __future__ import annotations

import copy
from typing import Any

from loraplane.localkube.resources import ResourceType

Obj = dict[str, Any]

POD_SPEC = {
    "restartPolicy": "Always",
    "terminationGracePeriodSeconds": 30,
    "dnsPolicy": "ClusterFirst",
    "securityContext": {},
    "schedulerName": "default-scheduler",
    "enableServiceLinks": True,
}
CONTAINER = {
    "resources": {},
    "terminationMessagePath": "/dev/termination-log",
    "terminationMessagePolicy": "File",
}
PROBE = {"timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3}
DEPLOYMENT = {
    "replicas": 1,
    "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}},
    "revisionHistoryLimit": 10,
    "progressDeadlineSeconds": 600,
}
STATEFULSET = {
    "replicas": 1,
    "podManagementPolicy": "OrderedReady",
    "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"partition": 0}},
    "revisionHistoryLimit": 10,
    "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Retain", "whenScaled": "Retain"},
}
KINDS = {
    ("", "pods"),
    ("", "services"),
    ("apps", "deployments"),
    ("apps", "statefulsets"),
    ("networking.k8s.io", "networkpolicies"),
}
SERVICE = {"type": "ClusterIP", "sessionAffinity": "None", "internalTrafficPolicy": "Cluster"}


def _fill(obj: Obj, defaults: Obj) -> None:
    for k, v in defaults.items():
        if k not in obj:
            obj[k] = _copy(v)


def _copy(v: Any) -> Any:
    return {k: _copy(x) for k, x in v.items()} if isinstance(v, dict) else v


def _pull_policy(image: str) -> str:
    """Always for `:latest` or no tag (and no digest), IfNotPresent otherwise."""
    if "@" in image:
        return "IfNotPresent"
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    return "Always" if tag in ("", "latest") else "IfNotPresent"


def _ports(ports: Any) -> None:
    for p in ports if isinstance(ports, list) else []:
        if isinstance(p, dict):
            p.setdefault("protocol", "TCP")


def _probe(probe: Any) -> None:
    if not isinstance(probe, dict):
        return
    _fill(probe, PROBE)
    if isinstance(probe.get("httpGet"), dict):
        probe["httpGet"].setdefault("scheme", "HTTP")


def _container(c: Any) -> None:
    if not isinstance(c, dict):
        return
    _fill(c, CONTAINER)
    if isinstance(c.get("image"), str):
        c.setdefault("imagePullPolicy", _pull_policy(c["image"]))
    _ports(c.get("ports"))
    for kind in ("livenessProbe", "readinessProbe", "startupProbe"):
        _probe(c.get(kind))
    for env in c.get("env") or []:
        ref = (env.get("valueFrom") or {}).get("fieldRef") if isinstance(env, dict) else None
        if isinstance(ref, dict):
            ref.setdefault("apiVersion", "v1")


def _volume(v: Any) -> None:
    if not isinstance(v, dict):
        return
    for source in ("configMap", "secret", "projected", "downwardAPI"):
        if isinstance(v.get(source), dict):
            v[source].setdefault("defaultMode", 420)


def pod_spec(spec: Any) -> None:
    if not isinstance(spec, dict):
        return
    _fill(spec, POD_SPEC)
    for key in ("containers", "initContainers"):
        for c in spec.get(key) or []:
            _container(c)
    for v in spec.get("volumes") or []:
        _volume(v)


def _template(spec: Any) -> None:
    if isinstance(spec, dict) and isinstance(spec.get("template"), dict):
        pod_spec(spec["template"].get("spec"))


def apply(rt: ResourceType, obj: Obj) -> Obj:
    """The object with the defaults of its kind filled in (a copy of spec: nested parts may be shared
    with the stored object)."""
    if not isinstance(obj.get("spec"), dict) or (rt.group, rt.plural) not in KINDS:
        return obj
    obj = {**obj, "spec": copy.deepcopy(obj["spec"])}
    _apply(rt, obj["spec"])
    return obj


def _apply(rt: ResourceType, spec: Obj) -> None:
    kind = (rt.group, rt.plural)
    if kind == ("", "pods"):
        pod_spec(spec)
    elif kind == ("apps", "deployments"):
        _fill(spec, DEPLOYMENT)
        _template(spec)
    elif kind == ("apps", "statefulsets"):
        _fill(spec, STATEFULSET)
        _template(spec)
        for claim in spec.get("volumeClaimTemplates") or []:
            if isinstance(claim, dict) and isinstance(claim.get("spec"), dict):
                claim["spec"].setdefault("volumeMode", "Filesystem")
    elif kind == ("", "services"):
        _fill(spec, SERVICE)
        for p in spec.get("ports") or []:
            if isinstance(p, dict):
                p.setdefault("protocol", "TCP")
                if "port" in p:
                    p.setdefault("targetPort", p["port"])
    elif kind == ("networking.k8s.io", "networkpolicies"):
        if "policyTypes" not in spec:
            spec["policyTypes"] = ["Ingress", *(["Egress"] if spec.get("egress") else [])]
        for rule in [*(spec.get("ingress") or []), *(spec.get("egress") or [])]:
            if isinstance(rule, dict):
                _ports(rule.get("ports"))
