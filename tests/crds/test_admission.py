"""Bad LoRAAdapter manifests are refused by `kubectl apply` itself, each with its own message.

These run through the real kubectl against the API server fixture (the local server, or a real
cluster with --kubeconfig), so they check the generated CRD schema and CEL rules end to end.
"""

from __future__ import annotations

import json

import pytest
import yaml

from loraplane.crds import paths

pytestmark = pytest.mark.kubectl

FORMS = "path must be a Hugging Face repo id (org/name or hf://org/name)"


def manifest(namespace: str, obj_name: str = "a", **spec: object) -> str:
    body = {"baseModel": "tiny-llama", "path": "org/adapter", **spec}
    body = {k: v for k, v in body.items() if v is not None}
    return yaml.safe_dump(
        {
            "apiVersion": "loraplane.io/v1alpha1",
            "kind": "LoRAAdapter",
            "metadata": {"name": obj_name, "namespace": namespace},
            "spec": body,
        }
    )


@pytest.fixture(scope="module", autouse=True)
def crds(kube) -> None:
    kube.apply_crds()


BAD = [
    ("relative path", {"path": "adapters/../sql"}, [paths.PATH_RULES[1].message]),
    ("relative path, no dots", {"path": "models/sql/v1"}, [FORMS]),
    ("dot-dot segment", {"path": "/models/../etc/passwd"}, ["must not contain '..' segments"]),
    (
        "unknown scheme",
        {"path": "gcs://bucket/sql"},
        [FORMS, "relative paths and other schemes are not accepted"],
    ),
    (
        "empty path",
        {"path": ""},
        ['spec.path: Invalid value: "": spec.path in body should be at least 1 chars long'],
    ),
    ("missing baseModel", {"baseModel": None}, ["spec.baseModel: Required value"]),
    (
        "wrong type",
        {"longContext": {"maxLength": "long"}},
        ['spec.longContext.maxLength: Invalid value: "string"', "must be of type integer"],
    ),
    ("over-long served name", {"name": "n" * 129}, ["spec.name: Too long: may not be more than 128"]),
    ("over-long path", {"path": "/" + "p" * 1100}, ["spec.path: Too long: may not be more than 1024"]),
    ("bad revision", {"revision": "main branch"}, ["spec.revision in body should match"]),
    ("zero maxLength", {"longContext": {"maxLength": 0}}, ["should be greater than or equal to 1"]),
    ("negative replicas", {"replicas": -1}, ["spec.replicas in body should be greater than or equal to 0"]),
    ("too many replicas", {"replicas": 257}, ["spec.replicas in body should be less than or equal to 256"]),
]


@pytest.mark.parametrize(("case", "spec", "fragments"), BAD, ids=[b[0] for b in BAD])
def test_kubectl_apply_refuses(kube, namespace: str, case: str, spec: dict, fragments: list[str]) -> None:
    proc = kube.kubectl("apply", "-f", "-", input=manifest(namespace, **spec), check=False)
    assert proc.returncode != 0, f"{case}: accepted:\n{proc.stdout}"
    for fragment in fragments:
        assert fragment in proc.stderr, f"{case}: {fragment!r} not in:\n{proc.stderr}"
    assert "not found" in kube.kubectl("get", "lora", "a", "-n", namespace, check=False).stderr


def test_over_long_object_name_is_refused(kube, namespace: str) -> None:
    proc = kube.kubectl("apply", "-f", "-", input=manifest(namespace, obj_name="n" * 254), check=False)
    assert proc.returncode != 0
    assert "must be no more than 253 characters" in proc.stderr


def test_oversized_object_hits_the_request_size_limit(kube, namespace: str) -> None:
    doc = yaml.safe_load(manifest(namespace))
    doc["metadata"]["annotations"] = {"blob": "x" * (3 * 1024 * 1024 + 16)}
    proc = kube.kubectl("create", "-f", "-", input=json.dumps(doc), check=False)
    assert proc.returncode != 0
    assert "Request entity too large" in proc.stderr or "too large" in proc.stderr.lower(), proc.stderr


def test_base_model_is_immutable(kube, namespace: str) -> None:
    kube.kubectl("apply", "-f", "-", input=manifest(namespace))
    proc = kube.kubectl("apply", "-f", "-", input=manifest(namespace, baseModel="other-model"), check=False)
    assert proc.returncode != 0
    assert "baseModel is immutable: create a new LoRAAdapter for another base model" in proc.stderr


def test_status_written_through_the_main_resource_is_ignored(kube, namespace: str) -> None:
    doc = yaml.safe_load(manifest(namespace))
    doc["status"] = {"id": 7, "phase": "Ready"}
    kube.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc))
    got = json.loads(kube.kubectl("get", "lora", "a", "-n", namespace, "-o", "json").stdout)
    assert "status" not in got or "id" not in got["status"], got.get("status")
    kube.kubectl("patch", "lora", "a", "-n", namespace, "--type", "merge", "-p", '{"status":{"id":9}}')
    got = json.loads(kube.kubectl("get", "lora", "a", "-n", namespace, "-o", "json").stdout)
    assert (got.get("status") or {}).get("id") is None


def test_unknown_fields_are_refused_by_kubectl_strict_validation(kube, namespace: str) -> None:
    doc = yaml.safe_load(manifest(namespace))
    doc["spec"]["colour"] = "blue"
    proc = kube.kubectl("apply", "-f", "-", input=yaml.safe_dump(doc), check=False)
    assert proc.returncode != 0
    assert 'unknown field "spec.colour"' in proc.stderr


def test_good_examples_apply_and_show_in_get(kube) -> None:
    kube.kubectl("create", "namespace", "default", check=False)
    files = [
        "-f",
        "examples/hf-adapter.yaml",
        "-f",
        "examples/local-adapter.yaml",
        "-f",
        "examples/s3-adapter.yaml",
    ]
    try:
        kube.kubectl("apply", *files)
        out = kube.kubectl("get", "lora", "-A").stdout
    finally:  # the examples live in `default`: leave a real cluster as it was
        kube.kubectl("delete", "--ignore-not-found", *files)
    header = out.splitlines()[0].split()
    assert header[:4] == ["NAMESPACE", "NAME", "SERVED", "NAME"] or "SERVED NAME" in out.splitlines()[0]
    for name in ("sql-lora", "support-bot", "legal-summaries"):
        assert name in out
