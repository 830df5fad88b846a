"""kube-apiserver v1.36.2 answers observed outside the recordings (the real-cluster run of issue 15),
pinned so localkube keeps them. Each test runs against a real cluster too (--kubeconfig), where it
checks the observation itself."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests

ADAPTERS = "/apis/loraplane.io/v1alpha1/namespaces/{ns}/loraadapters"


@pytest.fixture
def http(kube: Any) -> Iterator[requests.Session]:
    kube.apply_crds()
    with kube.http() as s:
        yield s


def _causes(http: requests.Session, kube: Any, namespace: str, spec: dict[str, Any]) -> list[dict[str, str]]:
    body = {
        "apiVersion": "loraplane.io/v1alpha1",
        "kind": "LoRAAdapter",
        "metadata": {"name": "a"},
        "spec": spec,
    }
    r = http.post(kube.url + ADAPTERS.format(ns=namespace), json=body)
    assert r.status_code == 422, r.text
    return r.json()["details"]["causes"]


def test_cel_rule_on_a_field_shows_the_value(kube: Any, http: requests.Session, namespace: str) -> None:
    causes = _causes(http, kube, namespace, {"baseModel": "m", "path": "s3:/bucket/a"})
    (cause,) = [c for c in causes if c["field"] == "spec.path"]
    assert cause["reason"] == "FieldValueInvalid"
    assert cause["message"].startswith('Invalid value: "s3:/bucket/a": path must be '), cause


def test_one_string_error_per_field_length_first(kube: Any, http: requests.Session, namespace: str) -> None:
    """ "" breaks minLength and pattern: kube-openapi's string validator stops at the length error."""
    causes = _causes(http, kube, namespace, {"baseModel": "", "path": "org/name"})
    assert [c for c in causes if c["field"] == "spec.baseModel"] == [
        {
            "reason": "FieldValueInvalid",
            "message": 'Invalid value: "": spec.baseModel in body should be at least 1 chars long',
            "field": "spec.baseModel",
        }
    ]


def test_built_in_defaults(kube: Any, http: requests.Session, namespace: str) -> None:
    base = f"{kube.url}/apis/apps/v1/namespaces/{namespace}/deployments"
    container = {"name": "c", "image": "img:1", "ports": [{"containerPort": 80, "name": "http"}]}
    container["readinessProbe"] = {"httpGet": {"path": "/ready", "port": "http"}}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "d"},
        "spec": {
            "selector": {"matchLabels": {"app": "d"}},
            "template": {"metadata": {"labels": {"app": "d"}}, "spec": {"containers": [container]}},
        },
    }
    r = http.post(base, json=deployment)
    assert r.status_code == 201, r.text
    spec = http.get(base + "/d").json()["spec"]
    assert {
        k: spec[k] for k in ("replicas", "revisionHistoryLimit", "progressDeadlineSeconds", "strategy")
    } == {
        "replicas": 1,
        "revisionHistoryLimit": 10,
        "progressDeadlineSeconds": 600,
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "25%", "maxSurge": "25%"}},
    }
    pod = spec["template"]["spec"]
    assert {
        k: pod[k] for k in ("restartPolicy", "dnsPolicy", "schedulerName", "terminationGracePeriodSeconds")
    } == {
        "restartPolicy": "Always",
        "dnsPolicy": "ClusterFirst",
        "schedulerName": "default-scheduler",
        "terminationGracePeriodSeconds": 30,
    }
    (c,) = pod["containers"]
    assert c["ports"] == [{"containerPort": 80, "name": "http", "protocol": "TCP"}]
    assert (c["imagePullPolicy"], c["terminationMessagePath"], c["terminationMessagePolicy"]) == (
        "IfNotPresent",
        "/dev/termination-log",
        "File",
    )
    assert c["readinessProbe"] == {
        "httpGet": {"path": "/ready", "port": "http", "scheme": "HTTP"},
        "timeoutSeconds": 1,
        "periodSeconds": 10,
        "successThreshold": 1,
        "failureThreshold": 3,
    }
    svc = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "s"},
        "spec": {"selector": {"app": "d"}, "ports": [{"name": "http", "port": 80}]},
    }
    r = http.post(f"{kube.url}/api/v1/namespaces/{namespace}/services", json=svc)
    assert r.status_code == 201, r.text
    got = r.json()["spec"]
    assert got["ports"] == [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 80}]
    assert (got["type"], got["sessionAffinity"]) == ("ClusterIP", "None")


def test_a_deleted_namespace_is_terminating_with_its_content_first(kube: Any, http: requests.Session) -> None:
    """The namespace controller works after the DELETE has answered, never within it: a test must
    wait for the content to go, and must not count on it staying either."""
    ns = kube.create_namespace("del")
    try:
        cm = f"{kube.url}/api/v1/namespaces/{ns}/configmaps"
        assert http.post(cm, json={"metadata": {"name": "c"}}).status_code == 201
        assert http.delete(f"{kube.url}/api/v1/namespaces/{ns}").json()["status"]["phase"] == "Terminating"
        # Still there right after the answer (the real controller took 5-10 s; localkube 0.5 s).
        assert http.get(cm + "/c").status_code == 200
        got = http.get(f"{kube.url}/api/v1/namespaces/{ns}").json()
        assert got["status"]["phase"] == "Terminating" and got["spec"]["finalizers"] == ["kubernetes"]
    finally:
        kube.delete_namespace(ns, wait=60)
