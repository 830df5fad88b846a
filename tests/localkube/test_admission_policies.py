"""ValidatingAdmissionPolicy on the API server fixture: the subset localkube evaluates (docs/localkube.md).

Runs on the embedded server and, with --kubeconfig, on a real one (the judge). Policies match only
ConfigMaps in the test's namespace, so nothing else on a shared cluster is affected.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

BASE = "/apis/admissionregistration.k8s.io/v1"


@pytest.fixture
def apply_policy(kube: Any, namespace: str) -> Iterator[Any]:
    http = kube.http()
    made: list[str] = []

    def apply(validations: list[dict[str, Any]], actions: list[str], **spec: Any) -> None:
        name = f"t-{uuid.uuid4().hex[:8]}"
        policy = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicy",
            "metadata": {"name": name},
            "spec": {
                "failurePolicy": spec.pop("failurePolicy", "Fail"),
                "matchConstraints": {
                    "resourceRules": [
                        {
                            "apiGroups": [""],
                            "apiVersions": ["v1"],
                            "operations": ["CREATE"],
                            "resources": ["configmaps"],
                        }
                    ]
                },
                "validations": validations,
                **spec,
            },
        }
        binding = {
            "apiVersion": "admissionregistration.k8s.io/v1",
            "kind": "ValidatingAdmissionPolicyBinding",
            "metadata": {"name": name},
            "spec": {
                "policyName": name,
                "validationActions": actions,
                "matchResources": {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
                    "objectSelector": {"matchExpressions": [{"key": "checked", "operator": "Exists"}]},
                },
            },
        }
        for kind, obj in (
            ("validatingadmissionpolicies", policy),
            ("validatingadmissionpolicybindings", binding),
        ):
            r = http.post(f"{kube.url}{BASE}/{kind}", json=obj)
            assert r.status_code == 201, r.text
        made.append(name)

    yield apply
    for name in made:
        http.delete(f"{kube.url}{BASE}/validatingadmissionpolicybindings/{name}")
        http.delete(f"{kube.url}{BASE}/validatingadmissionpolicies/{name}")


def _create(kube: Any, namespace: str, data: dict[str, str], checked: bool = True) -> Any:
    """Create a ConfigMap; on a real server retry (bounded) while a new policy is not enforced yet."""
    http = kube.http()
    labels = {"checked": "yes"} if checked else {}
    deadline = time.monotonic() + 30
    while True:
        name = f"cm-{uuid.uuid4().hex[:8]}"
        body = {"metadata": {"name": name, "labels": labels}, "data": data}
        r = http.post(f"{kube.url}/api/v1/namespaces/{namespace}/configmaps", json=body)
        if r.status_code != 201 or r.headers.get("Warning") or not checked or time.monotonic() > deadline:
            return r
        if kube.is_local:
            return r
        time.sleep(0.5)


def test_deny_reason_message_expression_and_selectors(kube: Any, namespace: str, apply_policy: Any) -> None:
    apply_policy(
        [
            {
                "expression": "has(object.data.owner)",
                "messageExpression": "'configmap ' + object.metadata.name + ' needs data.owner'",
                "reason": "Forbidden",
            },
        ],
        ["Deny"],
        matchConditions=[{"name": "not-exempt", "expression": "!has(object.data.exempt)"}],
    )
    r = _create(kube, namespace, {"x": "1"})
    assert r.status_code == 403, r.text
    body = r.json()
    name = body["details"]["name"]
    assert body["reason"] == "Forbidden" and body["details"]["kind"] == "configmaps", body
    message = body["message"]
    assert message.startswith(f'configmaps "{name}" is forbidden: ValidatingAdmissionPolicy '), message
    assert message.endswith(f"' denied request: configmap {name} needs data.owner"), message
    assert "' with binding '" in message and body["details"]["causes"] == [
        {"message": message.split(": ", 1)[1]}
    ]
    assert _create(kube, namespace, {"owner": "team-a"}).status_code == 201
    assert _create(kube, namespace, {"x": "1"}, checked=False).status_code == 201  # objectSelector
    assert _create(kube, namespace, {"exempt": "yes"}).status_code == 201  # matchConditions


def test_warn_failed_expression_and_failure_policy(kube: Any, namespace: str, apply_policy: Any) -> None:
    apply_policy([{"expression": "object.data.size() < 2"}], ["Warn"])
    r = _create(kube, namespace, {"a": "1", "b": "2"})
    assert r.status_code == 201, r.text
    assert "Validation failed for ValidatingAdmissionPolicy" in r.headers.get("Warning", ""), r.headers
    assert "failed expression: object.data.size() < 2" in r.headers["Warning"]

    # An expression that errors: Ignore lets the write through; Fail denies it (422 Invalid by default).
    apply_policy([{"expression": "object.data.owner == 'x'"}], ["Deny"], failurePolicy="Ignore")
    assert _create(kube, namespace, {"a": "1"}).status_code == 201
    apply_policy([{"expression": "object.data.owner == 'x'"}], ["Deny"])
    r = _create(kube, namespace, {"a": "1"})
    assert r.status_code == 422 and r.json()["reason"] == "Invalid", r.text
    assert "resulted in error" in r.json()["message"], r.text
