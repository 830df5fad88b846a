"""kubectl as a user runs it: apply, get with printer columns, explain, wait, patch, delete."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).parent
CRD = HERE / "recordings" / "crd.yaml"
pytestmark = pytest.mark.kubectl


def manifest(name: str, namespace: str, spec: str) -> str:
    return (
        f"apiVersion: demo.example.com/v1alpha1\nkind: Widget\nmetadata:\n  name: {name}\n"
        f"  namespace: {namespace}\nspec:\n{spec}"
    )


@pytest.fixture(scope="module")
def crd(kube: Any) -> Iterator[None]:
    with kube.removing_crds({"widgets.demo.example.com"}):
        kube.kubectl("apply", "-f", str(CRD))
        kube.kubectl("wait", "--for=condition=Established", "crd/widgets.demo.example.com", "--timeout=20s")
        yield


def test_apply_twice_then_get_all_namespaces_shows_printer_columns(
    kube: Any, crd: None, namespace: str
) -> None:
    m = manifest("w-a", namespace, "  base: models/a\n  path: /x\n  size: 3\n")
    out = kube.kubectl("apply", "-f", "-", input=m).stdout
    assert "widget.demo.example.com/w-a created" in out
    out = kube.kubectl("apply", "-f", "-", input=m.replace("size: 3", "size: 4")).stdout
    assert "widget.demo.example.com/w-a configured" in out
    out = kube.kubectl("apply", "-f", "-", input=m.replace("size: 3", "size: 4")).stdout
    assert "widget.demo.example.com/w-a unchanged" in out
    table = kube.kubectl("get", "wd", "-A").stdout.splitlines()
    assert table[0].split() == ["NAMESPACE", "NAME", "BASE", "ID", "PHASE", "AGE"]
    row = next(line.split() for line in table if "w-a" in line)
    assert row[:3] == [namespace, "w-a", "models/a"]  # ID and Phase are null cells: kubectl prints nothing
    obj = json.loads(kube.kubectl("get", "wd", "w-a", "-n", namespace, "-o", "json").stdout)
    assert obj["spec"]["size"] == 4 and obj["metadata"]["generation"] == 2
    assert "kubectl.kubernetes.io/last-applied-configuration" in obj["metadata"]["annotations"]


def test_get_by_category_and_short_name(kube: Any, crd: None, namespace: str) -> None:
    kube.kubectl("apply", "-f", "-", input=manifest("w-c", namespace, "  base: b\n"))
    assert "w-c" in kube.kubectl("get", "demo", "-n", namespace).stdout
    assert "w-c" in kube.kubectl("get", "widget", "-n", namespace, "-l", "!nothing").stdout


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            "  base: b\n  path: relative/x\n",
            "spec.path: Invalid value: \"relative/x\": spec.path in body should match '^/[A-Za-z0-9._/-]*$'",
        ),
        ("  base: b\n  mode: c\n", 'spec.mode: Unsupported value: "c": supported values: "a", "b"'),
        ("  base: b\n  mode: b\n  size: 3\n", "spec: Invalid value: mode b requires size >= 10"),
        ("  path: /x\n", "spec.base: Required value"),
        (
            "  base: b\n  size: many\n",
            'spec.size: Invalid value: "string": spec.size in body must be of type integer',
        ),
        ("  base: b\n  colour: red\n", 'strict decoding error: unknown field "spec.colour"'),
    ],
    ids=["pattern", "enum", "cel", "required", "type", "unknown-field"],
)
def test_apply_refuses_invalid_widgets(kube: Any, crd: None, namespace: str, spec: str, message: str) -> None:
    proc = kube.kubectl("apply", "-f", "-", input=manifest("w-bad", namespace, spec), check=False)
    assert proc.returncode == 1
    assert message in proc.stderr


def test_oversized_object_is_refused_with_the_size_limit(kube: Any, crd: None, namespace: str) -> None:
    big = "x" * (3 * 1024 * 1024 + 10)
    m = manifest("w-big", namespace, "  base: b\n") + f"  path: /{big}\n"
    proc = kube.kubectl("create", "-f", "-", input=m, check=False)
    assert proc.returncode == 1
    assert "Request entity too large: limit is 3145728" in proc.stderr


def test_explain_shows_schema_fields(kube: Any, crd: None) -> None:
    out = kube.kubectl("explain", "widgets.spec").stdout
    assert "path\t<string>" in out and "An absolute path made of safe characters." in out
    assert "base\t<string> -required-" in out


def test_patch_types(kube: Any, crd: None, namespace: str) -> None:
    kube.kubectl("apply", "-f", "-", input=manifest("w-p", namespace, "  base: b\n  size: 1\n"))
    kube.kubectl("patch", "wd", "w-p", "-n", namespace, "--type", "merge", "-p", '{"spec":{"size":2}}')
    kube.kubectl(
        "patch",
        "wd",
        "w-p",
        "-n",
        namespace,
        "--type",
        "json",
        "-p",
        '[{"op":"test","path":"/spec/size","value":2},{"op":"replace","path":"/spec/size","value":3}]',
    )
    obj = json.loads(kube.kubectl("get", "wd", "w-p", "-n", namespace, "-o", "json").stdout)
    assert obj["spec"]["size"] == 3
    proc = kube.kubectl("patch", "wd", "w-p", "-n", namespace, "-p", '{"spec":{"size":4}}', check=False)
    assert proc.returncode == 1
    assert (
        "application/strategic-merge-patch+json is not supported by demo.example.com/v1alpha1" in proc.stderr
    )
    proc = kube.kubectl(
        "patch",
        "wd",
        "w-p",
        "-n",
        namespace,
        "--type",
        "json",
        "-p",
        '[{"op":"test","path":"/spec/size","value":99}]',
        check=False,
    )
    assert (
        proc.returncode == 1
        and "the server rejected our request due to an error in our request" in proc.stderr
    )


def test_status_written_through_main_resource_is_ignored(kube: Any, crd: None, namespace: str) -> None:
    m = manifest("w-s", namespace, "  base: b\n") + "status:\n  id: 5\n  phase: Ready\n"
    kube.kubectl("apply", "-f", "-", input=m)
    obj = json.loads(kube.kubectl("get", "wd", "w-s", "-n", namespace, "-o", "json").stdout)
    assert "status" not in obj


def test_delete_and_wait(kube: Any, crd: None, namespace: str) -> None:
    kube.kubectl("apply", "-f", "-", input=manifest("w-d", namespace, "  base: b\n"))
    kube.kubectl("delete", "wd", "w-d", "-n", namespace, "--wait=true", "--timeout=20s")
    proc = kube.kubectl("get", "wd", "w-d", "-n", namespace, check=False)
    assert proc.returncode == 1
    assert 'widgets.demo.example.com "w-d" not found' in proc.stderr


def test_create_namespace_and_configmap(kube: Any) -> None:
    kube.kubectl("create", "namespace", "kubectl-created-ns")
    try:
        kube.kubectl("create", "configmap", "cm1", "-n", "kubectl-created-ns", "--from-literal=a=b")
        data = json.loads(kube.kubectl("get", "cm", "cm1", "-n", "kubectl-created-ns", "-o", "json").stdout)
        assert data["data"] == {"a": "b"}
    finally:
        kube.kubectl("delete", "namespace", "kubectl-created-ns", "--wait=false")


def test_wait_for_a_status_condition(kube: Any, crd: None, namespace: str) -> None:
    kube.kubectl("apply", "-f", "-", input=manifest("w-ready", namespace, "  base: b\n"))
    cond = {
        "type": "Ready",
        "status": "True",
        "reason": "Done",
        "message": "ok",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    kube.kubectl(
        "patch",
        "wd",
        "w-ready",
        "-n",
        namespace,
        "--subresource=status",
        "--type",
        "merge",
        "-p",
        json.dumps({"status": {"conditions": [cond]}}),
    )
    out = kube.kubectl("wait", "--for=condition=Ready", "wd/w-ready", "-n", namespace, "--timeout=10s").stdout
    assert "condition met" in out


def test_reapplying_a_deployment_merges_containers_by_name(kube: Any, namespace: str) -> None:
    deployment = f"""apiVersion: apps/v1
kind: Deployment
metadata: {{name: op, namespace: {namespace}}}
spec:
  selector: {{matchLabels: {{app: op}}}}
  template:
    metadata: {{labels: {{app: op}}}}
    spec:
      containers:
      - name: op
        image: "img:1"
        ports: [{{containerPort: 8080, name: metrics}}]
        env: [{{name: A, value: "1"}}, {{name: B, value: "2"}}]
      - name: sidecar
        image: "side:1"
"""
    kube.kubectl("apply", "-f", "-", input=deployment)
    changed = deployment.replace("img:1", "img:2").replace('{name: B, value: "2"}', '{name: B, value: "3"}')
    kube.kubectl("apply", "-f", "-", input=changed)
    obj = json.loads(kube.kubectl("get", "deploy", "op", "-n", namespace, "-o", "json").stdout)
    containers = obj["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["op", "sidecar"]
    assert containers[0]["image"] == "img:2"
    # What was applied is kept; protocol is the server's default (kube-apiserver's and localkube's).
    assert containers[0]["ports"] == [{"containerPort": 8080, "name": "metrics", "protocol": "TCP"}]
    assert containers[0]["env"] == [{"name": "A", "value": "1"}, {"name": "B", "value": "3"}]
    assert not any(k.startswith("$") for k in obj["spec"]["template"]["spec"])
    kube.kubectl("apply", "-f", "-", input=changed.split("      - name: sidecar")[0])
    obj = json.loads(kube.kubectl("get", "deploy", "op", "-n", namespace, "-o", "json").stdout)
    assert [c["name"] for c in obj["spec"]["template"]["spec"]["containers"]] == ["op"]
