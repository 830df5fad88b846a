"""The chart rendered by Helm's own engine: every value set renders, lints, validates against the
Kubernetes schemas and applies to the API server; the security and wiring promises hold."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from support import chartkit

VALUE_SETS = chartkit.VALUE_SETS
# Prometheus Operator and Gateway API Inference Extension kinds: not in the Kubernetes schemas (the
# InferencePool is checked against its CRD's schema in test_inferencepool.py).
NOT_KUBERNETES = {
    "monitoring.coreos.com/v1": {"ServiceMonitor", "PrometheusRule"},
    "inference.networking.k8s.io/v1": {"InferencePool"},
}


@pytest.mark.parametrize("k8s", chartkit.K8S_VERSIONS)
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_strict(name: str, k8s: str) -> None:
    import helm_python

    report = helm_python.lint(
        chartkit.CHART, VALUE_SETS[name], strict=True, namespace=chartkit.NAMESPACE, kube_version=f"v{k8s}"
    )
    problems = [
        m for m in report["messages"] if m["severity"] >= 2 and "icon is recommended" not in m["error"]
    ]
    assert not problems and not report["errors"], report


@pytest.mark.parametrize("k8s", chartkit.K8S_VERSIONS)
@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_manifests_validate_against_kubernetes_schemas(name: str, k8s: str) -> None:
    import kubernetes_validate

    objs = chartkit.manifests(VALUE_SETS[name])
    assert objs
    for obj in objs:
        if obj["apiVersion"] in NOT_KUBERNETES:
            assert obj["kind"] in NOT_KUBERNETES[obj["apiVersion"]] and obj["spec"], obj
            continue
        try:
            kubernetes_validate.validate(obj, k8s, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(
                f"{obj['kind']}/{obj['metadata']['name']} ({name}, k8s {k8s}): {e.message} at {list(e.path)}"
            )


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_names_labels_and_namespaces(name: str) -> None:
    objs = chartkit.manifests(VALUE_SETS[name])
    keys = [(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]) for o in objs]
    assert len(keys) == len(set(keys)), f"duplicate objects: {sorted(keys)}"
    for o in objs:
        meta = o["metadata"]
        assert len(meta["name"]) <= 63, meta["name"]
        labels = meta["labels"]
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/component",
            "app.kubernetes.io/managed-by",
            "app.kubernetes.io/version",
            "helm.sh/chart",
        ):
            assert key in labels, (o["kind"], meta["name"], key)
        for label, value in VALUE_SETS[name].get("commonLabels", {}).items():
            assert labels[label] == value
        cluster_scoped = o["kind"] in ("ClusterRole", "ClusterRoleBinding")
        assert ("namespace" in meta) != cluster_scoped, (o["kind"], meta)


def _workloads(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] in ("Deployment", "StatefulSet")]


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_pods_are_locked_down_and_selectors_match(name: str) -> None:
    objs = chartkit.manifests(VALUE_SETS[name])
    services = chartkit.by_kind(objs, "Service")
    for w in _workloads(objs):
        pod = w["spec"]["template"]
        selector = w["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pod["metadata"]["labels"].items()
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        for c in spec["containers"]:
            if c["name"] not in ("worker", "operator"):
                continue  # a sidecar the user added is theirs to lock down
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["livenessProbe"] and c["readinessProbe"]
            assert "@sha256:" in c["image"] or ":" in c["image"].rsplit("/", 1)[-1], c["image"]
        # Every workload is reachable through a Service with the same selector.
        assert any(s["spec"]["selector"] == selector for s in services), w["metadata"]["name"]


def test_worker_pools_wiring() -> None:
    objs = chartkit.manifests(VALUE_SETS["two-pools"])
    deployments = {d["metadata"]["name"]: d for d in chartkit.by_kind(objs, "Deployment")}
    gpu = deployments["lp-loraplane-worker-llama-7b"]["spec"]
    cpu = deployments["lp-loraplane-worker-small-cpu"]["spec"]
    assert (gpu["replicas"], cpu["replicas"]) == (3, 2)
    gc, cc = gpu["template"]["spec"]["containers"][0], cpu["template"]["spec"]["containers"][0]
    assert gc["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gc["image"] == "ghcr.io/loraplane/loraplane-worker-cuda:0.1.0"
    assert cc["image"] == "ghcr.io/loraplane/loraplane-worker-cpu:0.1.0-rc1"
    assert "--served-model-name=llama-2-7b" in gc["args"] and "--device=cuda" in gc["args"]
    for flag in (
        "--device=cpu",
        "--max-loras=4",
        "--max-lora-rank=16",
        "--max-cpu-loras=8",
        "--local-roots=/models/adapters",
        "--base-model=/models/tiny-llama",
        "--port=8000",
    ):
        assert flag in cc["args"], flag
    assert not any(a.startswith("--namespace") for a in cc["args"]), (
        "cluster-wide workers watch every namespace"
    )
    env = {e["name"]: e for e in cc["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "hf-token",
        "key": "HF_TOKEN",
        "optional": True,
    }
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "s3-creds"
    assert "--s3-endpoint=http://minio.storage:9000" in cc["args"] and "--s3-region=us-east-1" in cc["args"]
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert f"--endpoint=http://$(POD_IP):{8000}" in cc["args"]
    assert cpu["template"]["spec"]["nodeSelector"] == {"kubernetes.io/arch": "amd64"}
    assert "podAntiAffinity" in cpu["template"]["spec"]["affinity"]
    assert gpu["template"]["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    cache = {v["name"]: v for v in gpu["template"]["spec"]["volumes"]}["cache"]
    assert cache["emptyDir"]["sizeLimit"] == "50Gi"
    services = {s["metadata"]["name"]: s for s in chartkit.by_kind(objs, "Service")}
    assert services["lp-loraplane-worker-small-cpu"]["spec"]["ports"][0]["port"] == 8080


def test_default_values_carry_no_secrets() -> None:
    objs = chartkit.manifests({})
    env = {
        e["name"]
        for d in _workloads(objs)
        for c in d["spec"]["template"]["spec"]["containers"]
        for e in c.get("env", [])
    }
    assert not env & {"HF_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}


def test_pvc_cache_makes_a_statefulset() -> None:
    objs = chartkit.manifests(VALUE_SETS["pvc-cache"])
    assert not [d for d in chartkit.by_kind(objs, "Deployment") if "worker" in d["metadata"]["name"]]
    (sts,) = chartkit.by_kind(objs, "StatefulSet")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "cache"
    assert claim["spec"]["resources"]["requests"]["storage"] == "200Gi"
    assert claim["spec"]["storageClassName"] == "fast-ssd"
    assert "cache" not in {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert "--cache-bytes=90000000000" in sts["spec"]["template"]["spec"]["containers"][0]["args"]
    headless = {s["metadata"]["name"]: s for s in chartkit.by_kind(objs, "Service")}[
        sts["spec"]["serviceName"]
    ]
    assert headless["spec"]["clusterIP"] == "None"


def test_namespaced_mode_grants_nothing_cluster_wide_on_adapters() -> None:
    objs = chartkit.manifests(VALUE_SETS["namespaced"])
    for role in chartkit.by_kind(objs, "ClusterRole"):
        resources = {r for rule in role["rules"] for r in rule["resources"]}
        assert not resources & {"loraadapters", "loraadapters/status", "loraworkers", "pods", "events"}, role
    adapter_roles = [r for r in chartkit.by_kind(objs, "Role") if r["metadata"]["name"].endswith("-adapters")]
    assert sorted({r["metadata"]["namespace"] for r in adapter_roles}) == ["team-a", "team-b"]
    (op,) = [d for d in chartkit.by_kind(objs, "Deployment") if d["metadata"]["name"].endswith("-operator")]
    container = op["spec"]["template"]["spec"]["containers"][0]
    assert "--namespace=team-a" in container["args"] and "--namespace=team-b" in container["args"]
    assert "--all-namespaces" not in container["args"]
    assert container["image"] == "ghcr.io/loraplane/loraplane-operator@sha256:" + "ab" * 32
    assert op["spec"]["replicas"] == 2
    (worker,) = [d for d in chartkit.by_kind(objs, "Deployment") if "-worker-" in d["metadata"]["name"]]
    assert "--namespaces=team-a,team-b" in worker["spec"]["template"]["spec"]["containers"][0]["args"]


def test_extras_servicemonitor_pdb_networkpolicy() -> None:
    objs = chartkit.manifests(VALUE_SETS["extras"])
    monitors = chartkit.by_kind(objs, "ServiceMonitor")
    assert len(monitors) == 3 and all(m["metadata"]["labels"]["release"] == "prometheus" for m in monitors)
    services = chartkit.by_kind(objs, "Service")
    for m in monitors:  # each ServiceMonitor selects a Service that has the port it scrapes
        (svc,) = [
            s
            for s in services
            if m["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
            and s["spec"].get("clusterIP") != "None"
        ]
        assert m["spec"]["endpoints"][0]["port"] in {p["name"] for p in svc["spec"]["ports"]}
    pdbs = {p["metadata"]["name"]: p["spec"] for p in chartkit.by_kind(objs, "PodDisruptionBudget")}
    assert pdbs["lp-loraplane-worker-default"]["minAvailable"] == "50%"
    assert pdbs["lp-loraplane-worker-small-cpu"]["maxUnavailable"] == 1
    policies = chartkit.by_kind(objs, "NetworkPolicy")
    assert len(policies) == 3
    worker_policy = next(p for p in policies if p["metadata"]["name"] == "lp-loraplane-worker-default")
    peers = worker_policy["spec"]["ingress"][0]["from"]
    assert {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}} in peers
    assert len(peers) == 2


def test_notes_tell_what_to_do_next() -> None:
    notes = chartkit.render({})["loraplane/templates/NOTES.txt"]
    for needle in (
        "kubectl get lora -A",
        "kubectl apply -f",
        "port-forward svc/lp-loraplane-worker-default",
        "curl -s localhost:8000/v1/models",
    ):
        assert needle in notes, needle
    namespaced = chartkit.render(VALUE_SETS["namespaced"])["loraplane/templates/NOTES.txt"]
    assert "watched in: team-a, team-b" in namespaced


def test_chart_crds_validate_and_examples_match_their_schema() -> None:
    import jsonschema
    import kubernetes_validate

    crds = chartkit.chart_crds()
    assert {c["spec"]["names"]["kind"] for c in crds} == {"LoRAAdapter", "LoRAWorker"}
    for crd in crds:
        kubernetes_validate.validate(crd, chartkit.K8S_VERSIONS[0], strict=True)
    (adapter_crd,) = [c for c in crds if c["spec"]["names"]["kind"] == "LoRAAdapter"]
    schema = adapter_crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    examples = sorted((chartkit.REPO / "examples").glob("*-adapter.yaml"))
    assert len(examples) >= 3
    for path in examples:
        doc = yaml.safe_load(path.read_text())
        jsonschema.validate(doc, schema)


def test_chart_crds_identical_to_generated_crds() -> None:
    generated = {p.name: p.read_bytes() for p in (chartkit.REPO / "crds").glob("*.yaml")}
    in_chart = {p.name: p.read_bytes() for p in (chartkit.CHART / "crds").glob("*.yaml")}
    assert generated, "crds/*.yaml is missing: run `make crds`"
    assert in_chart.keys() == generated.keys(), "chart crds/ differs from crds/: run `make crds`"
    for name, data in generated.items():
        assert in_chart[name] == data, f"charts/loraplane/crds/{name} is stale: run `make crds`"
