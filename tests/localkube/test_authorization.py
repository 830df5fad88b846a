"""RBAC as kube-apiserver enforces it, with its review APIs and TokenRequest: on localkube started with
authorization="RBAC", and on a real cluster (--kubeconfig) the same test checks the real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.kube import Kube

SA = "reader"
RBAC = "/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}"


@pytest.fixture
def enforcing(kube: Kube, tmp_path: Path) -> Iterator[Kube]:
    """A server that enforces RBAC: localkube in RBAC mode, or the real cluster itself."""
    if not kube.is_local:
        yield kube
        return
    from loraplane.localkube import LocalKube, write_kubeconfig

    with LocalKube(authorization="RBAC") as srv:
        yield Kube(str(write_kubeconfig(srv.url, tmp_path / "admin.kubeconfig")), srv.url, True, srv)


@pytest.fixture
def reader(enforcing: Kube) -> Iterator[tuple[Kube, str, Any]]:
    """A namespace with a ServiceAccount that may get and list one ConfigMap by name; its session."""
    ns = enforcing.create_namespace("authz")
    try:
        with enforcing.http() as admin:
            u = enforcing.url
            assert admin.post(
                f"{u}/api/v1/namespaces/{ns}/serviceaccounts", json={"metadata": {"name": SA}}
            ).ok
            for name in ("cm1", "cm2"):
                admin.post(f"{u}/api/v1/namespaces/{ns}/configmaps", json={"metadata": {"name": name}})
            rule = {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "verbs": ["get", "list"],
                "resourceNames": ["cm1"],
            }
            admin.post(u + RBAC.format(ns=ns) + "/roles", json={"metadata": {"name": "r"}, "rules": [rule]})
            binding = {
                "metadata": {"name": "rb"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r"},
                "subjects": [{"kind": "ServiceAccount", "name": SA, "namespace": ns}],
            }
            assert admin.post(u + RBAC.format(ns=ns) + "/rolebindings", json=binding).ok
        as_sa = Kube(enforcing.kubeconfig_for_service_account(ns, SA), enforcing.url, enforcing.is_local)
        with as_sa.http() as http:
            yield enforcing, ns, http
    finally:
        enforcing.delete_namespace(ns)


def test_rules_allow_and_deny_with_kube_apiservers_answers(reader) -> None:
    kube, ns, http = reader
    base = f"{kube.url}/api/v1/namespaces/{ns}/configmaps"
    assert http.get(base + "/cm1").status_code == 200
    assert http.get(base, params={"fieldSelector": "metadata.name=cm1"}).status_code == 200
    denied = http.get(base + "/cm2")
    assert denied.status_code == 403
    user = f"system:serviceaccount:{ns}:{SA}"
    assert denied.json() == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f'configmaps "cm2" is forbidden: User "{user}" cannot get resource "configmaps" in API '
        f'group "" in the namespace "{ns}"',
        "reason": "Forbidden",
        "details": {"name": "cm2", "kind": "configmaps"},
        "code": 403,
    }
    listed = http.get(base).json()
    assert listed["message"] == (
        f'configmaps is forbidden: User "{user}" cannot list resource "configmaps" in API group "" '
        f'in the namespace "{ns}"'
    )
    crb = http.get(f"{kube.url}/apis/rbac.authorization.k8s.io/v1/clusterrolebindings").json()
    assert crb["message"].endswith('in API group "rbac.authorization.k8s.io" at the cluster scope')


def test_reviews_answer_from_the_same_rules(reader) -> None:
    kube, ns, http = reader
    user = f"system:serviceaccount:{ns}:{SA}"
    groups = ["system:serviceaccounts", f"system:serviceaccounts:{ns}", "system:authenticated"]
    reviews = f"{kube.url}/apis/authorization.k8s.io/v1"

    def sar(verb: str, name: str) -> dict[str, Any]:
        attrs = {"namespace": ns, "verb": verb, "resource": "configmaps", "name": name}
        body = {"spec": {"user": user, "groups": groups, "resourceAttributes": attrs}}
        with kube.http() as admin:
            r = admin.post(reviews + "/subjectaccessreviews", json=body)
        assert r.status_code == 201, r.text
        return r.json()["status"]

    assert sar("get", "cm1") == {
        "allowed": True,
        "reason": f'RBAC: allowed by RoleBinding "rb/{ns}" of Role "r" to ServiceAccount "{SA}/{ns}"',
    }
    assert sar("get", "cm2")["allowed"] is False
    assert sar("delete", "cm1")["allowed"] is False
    mine = http.post(
        reviews + "/selfsubjectaccessreviews",
        json={
            "spec": {
                "resourceAttributes": {
                    "namespace": ns,
                    "verb": "list",
                    "resource": "configmaps",
                    "name": "cm1",
                }
            }
        },
    )
    assert mine.status_code == 201 and mine.json()["status"]["allowed"] is True
    rules = http.post(reviews + "/selfsubjectrulesreviews", json={"spec": {"namespace": ns}}).json()["status"]
    assert {
        "verbs": ["get", "list"],
        "apiGroups": [""],
        "resources": ["configmaps"],
        "resourceNames": ["cm1"],
    } in (rules["resourceRules"])
    assert rules["incomplete"] is False
    who = http.post(f"{kube.url}/apis/authentication.k8s.io/v1/selfsubjectreviews", json={}).json()
    assert who["status"]["userInfo"]["username"] == user
    assert set(groups) <= set(who["status"]["userInfo"]["groups"])
