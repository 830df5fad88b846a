"""Provenance in the chart: signing trust wired into the workers, and the optional ValidatingAdmissionPolicy
that refuses an unpinned LoRAAdapter in a labelled namespace.

The policy and binding are rendered by Helm's engine from the chart and applied to the API server
fixture: the embedded server (which evaluates ValidatingAdmissionPolicy, docs/localkube.md) or a real
one with --kubeconfig. The same requests give the same answers on both.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from support import chartkit

from loraplane.crds.models import ADAPTER_PLURAL, GROUP, VERSION

LABEL = "loraplane.io/require-digest"
DIGEST = "sha256:" + "5e" * 32


def _policy_objects(release: str) -> list[dict[str, Any]]:
    objs = chartkit.manifests({"admissionPolicy": {"enabled": True}, "fullnameOverride": release})
    found = [o for o in objs if o["kind"].startswith("ValidatingAdmissionPolicy")]
    assert [o["kind"] for o in found] == ["ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"]
    return found


def test_off_by_default_and_valid_kubernetes_when_on() -> None:
    import kubernetes_validate

    assert not [o for o in chartkit.manifests({}) if o["kind"].startswith("ValidatingAdmissionPolicy")]
    for obj in _policy_objects("lp"):
        kubernetes_validate.validate(obj, "1.32.0", strict=True)  # admissionregistration v1: 1.30+


def _worker(values: dict[str, Any]) -> dict[str, Any]:
    (deployment,) = [
        d
        for d in chartkit.by_kind(chartkit.manifests(values), "Deployment")
        if "worker" in d["metadata"]["name"]
    ]
    return deployment["spec"]["template"]["spec"]


def test_signing_trust_is_mounted_and_passed_to_the_workers() -> None:
    trust = {"configMapName": "signers", "publicKeys": ["team.pub", "ci.pub"], "certificateChain": ["ca.pem"]}
    spec = _worker({
        "worker": {"signing": {"trust": trust, "sigstore": {"identity": "ci@example.com", "oidcIssuer": "https://issuer"}}},
        "workerPoolDefaults": {"requireSignatures": True},
    })  # fmt: skip
    (container,) = spec["containers"]
    assert [a for a in container["args"] if "signature" in a] == [
        "--require-signatures=on",
        "--signature-public-keys=/etc/loraplane/trust/team.pub,/etc/loraplane/trust/ci.pub",
        "--signature-certificate-chain=/etc/loraplane/trust/ca.pem",
        "--signature-identity=ci@example.com",
        "--signature-oidc-issuer=https://issuer",
    ]
    assert {"name": "signing-trust", "configMap": {"name": "signers"}} in spec["volumes"]
    mount = {"name": "signing-trust", "mountPath": "/etc/loraplane/trust", "readOnly": True}
    assert mount in container["volumeMounts"]
    plain = _worker({})
    assert not [a for a in plain["containers"][0]["args"] if "signature" in a]
    assert "signing-trust" not in [v["name"] for v in plain["volumes"]]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"workerPoolDefaults": {"requireSignatures": True}}, "requireSignatures needs trust material"),
        (
            {"worker": {"signing": {"trust": {"publicKeys": ["k.pub"]}}}},
            "set worker.signing.trust.secretName",
        ),
        (
            {"worker": {"signing": {"trust": {"secretName": "a", "configMapName": "b"}}}},
            "set secretName or configMapName, not both",
        ),
        ({"worker": {"signing": {"sigstore": {"identity": "x"}}}}, "identity and oidcIssuer go together"),
    ],
)
def test_signing_values_the_templates_refuse(values: dict[str, Any], message: str) -> None:
    from helm_python.errors import HelmRenderError

    with pytest.raises(HelmRenderError, match=message):
        chartkit.manifests(values)


def _adapter(name: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LoRAAdapter",
        "metadata": {"name": name},
        "spec": {"baseModel": "tiny", "path": "/models/adapters/sql", **spec},
    }


@pytest.fixture
def policy(kube: Any) -> Iterator[tuple[Any, str, str]]:
    """The chart's policy and binding applied; a labelled namespace and an unlabelled one."""
    kube.apply_crds()
    http = kube.http()
    release = f"vap-{uuid.uuid4().hex[:6]}"
    objs = _policy_objects(release)
    base = "/apis/admissionregistration.k8s.io/v1"
    paths = [f"{base}/validatingadmissionpolicies", f"{base}/validatingadmissionpolicybindings"]
    pinned, free = kube.create_namespace("pinned"), kube.create_namespace("free")
    http.patch(
        f"{kube.url}/api/v1/namespaces/{pinned}",
        json={"metadata": {"labels": {LABEL: "true"}}},
        headers={"Content-Type": "application/merge-patch+json"},
    ).raise_for_status()
    try:
        for path, obj in zip(paths, objs, strict=True):
            r = http.post(kube.url + path, json=obj)
            assert r.status_code == 201, r.text
        yield http, pinned, free
    finally:
        for path, obj in zip(paths, objs, strict=True):
            http.delete(f"{kube.url}{path}/{obj['metadata']['name']}")
        kube.delete_namespace(pinned)
        kube.delete_namespace(free)


def test_an_unpinned_adapter_is_refused_in_a_labelled_namespace(kube: Any, policy: Any) -> None:
    http, pinned, free = policy

    def create(ns: str, obj: dict[str, Any]) -> Any:
        return http.post(f"{kube.url}/apis/{GROUP}/{VERSION}/namespaces/{ns}/{ADAPTER_PLURAL}", json=obj)

    # kube-apiserver starts enforcing a new policy within about a second: retry (bounded) until it does.
    deadline = time.monotonic() + 30
    while True:
        r = create(pinned, _adapter("unpinned"))
        if r.status_code != 201 or time.monotonic() > deadline:
            break
        http.delete(f"{kube.url}/apis/{GROUP}/{VERSION}/namespaces/{pinned}/{ADAPTER_PLURAL}/unpinned")
        time.sleep(0.5)
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["reason"] == "Invalid" and body["details"]["kind"] == ADAPTER_PLURAL, body
    assert "denied request: spec.digest is required" in body["message"], body
    assert "loraplane validate --digest DIR" in body["message"], body

    assert create(pinned, _adapter("pinned", digest=DIGEST)).status_code == 201
    assert create(free, _adapter("unpinned")).status_code == 201  # no label: no policy

    # An update that drops the pin is refused too; status writes are not the policy's business.
    path = f"{kube.url}/apis/{GROUP}/{VERSION}/namespaces/{pinned}/{ADAPTER_PLURAL}/pinned"
    current = http.get(path).json()
    unpinned = copy.deepcopy(current)
    del unpinned["spec"]["digest"]
    r = http.put(path, json=unpinned)
    assert r.status_code == 422 and "spec.digest is required" in r.text, r.text
    r = http.patch(
        path + "/status",
        json={"status": {"message": "x"}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert r.status_code == 200, r.text
