"""The chart on a real platform: as a subchart, with the knobs platform teams set, with an
InferencePool per pool checked against the upstream CRD's schema, and with a `helm test` hook whose
check runs here against a real worker serving a tiny model."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import chartkit, models

from loraplane.worker import settings as worker_settings

PLATFORM = chartkit.VALUE_SETS["platform"]

# The InferencePool v1 spec as the upstream CRD validates it, written from the Go types with their
# kubebuilder markers: kubernetes-sigs/gateway-api-inference-extension api/v1/inferencepool_types.go
# (commit ca3d9dd43a88f33bafea0d873ee368621d21ff8d) and api/v1/shared_types.go (commit
# 573509ed0018e8b54b6c0c26f6e8c4260cf2a691). The status and metadata parts are left out.
_PORT = {
    "type": "object",
    "additionalProperties": False,
    "required": ["number"],
    "properties": {"number": {"type": "integer", "format": "int32", "minimum": 1, "maximum": 65535}},
}
INFERENCEPOOL_V1_SPEC = {
    "type": "object",
    "additionalProperties": False,
    "required": ["selector", "targetPorts", "endpointPickerRef"],
    "properties": {
        "selector": {
            "type": "object",
            "additionalProperties": False,
            "required": ["matchLabels"],
            "properties": {
                "matchLabels": {
                    "type": "object",
                    "maxProperties": 64,
                    "propertyNames": {
                        "minLength": 1,
                        "maxLength": 253,
                        "pattern": r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9]$",
                    },
                    "additionalProperties": {
                        "type": "string",
                        "maxLength": 63,
                        "pattern": r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$",
                    },
                }
            },
        },
        "targetPorts": {"type": "array", "minItems": 1, "maxItems": 1, "items": _PORT},
        "endpointPickerRef": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "group": {
                    "type": "string",
                    "maxLength": 253,
                    "pattern": r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
                },
                "kind": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 63,
                    "pattern": r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$",
                },
                "name": {"type": "string", "minLength": 1, "maxLength": 253},
                "port": _PORT,
                "failureMode": {"type": "string", "enum": ["FailOpen", "FailClose"]},
            },
        },
    },
}
# The type's x-kubernetes-validations rule (CEL), evaluated on endpointPickerRef with kind defaulted.
PORT_RULE = "self.kind != 'Service' || has(self.port)"


def _pods(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        o["metadata"]["name"]: o["spec"]["template"]["spec"]
        for o in objs
        if o["kind"] in ("Deployment", "StatefulSet")
    }


def test_renders_as_a_subchart_with_global_values(tmp_path: Path) -> None:
    """helm/helm#10392: a parent passes `global` (and often `enabled`) to every subchart."""
    import helm_python

    parent = tmp_path / "platform"
    shutil.copytree(chartkit.CHART, parent / "charts" / "loraplane")
    (parent / "Chart.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v2",
                "name": "platform",
                "version": "1.0.0",
                "dependencies": [{"name": "loraplane", "version": "0.1.0", "condition": "loraplane.enabled"}],
            }
        )
    )
    values = {"global": {"imagePullSecrets": [{"name": "org-pull"}], "storageClass": "fast"}}
    with helm_python.Chart.load(parent) as chart:
        on = chart.render(
            {**values, "loraplane": {"enabled": True}}, name="p", namespace="ml", is_install=True
        )
        off = chart.render(
            {**values, "loraplane": {"enabled": False}}, name="p", namespace="ml", is_install=True
        )
    docs = [
        d
        for path, text in on.items()
        if not path.endswith("NOTES.txt")
        for d in yaml.safe_load_all(text)
        if d
    ]
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert len(deployments) == 2  # the operator and the default pool
    for d in deployments:
        assert d["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": "org-pull"}]
    assert not [t for path, t in off.items() if "loraplane" in path and t.strip()]


def test_image_pull_secrets_take_both_forms_and_the_global_ones() -> None:
    objs = chartkit.manifests(PLATFORM)
    want = [{"name": "org-pull"}, {"name": "regcred"}, {"name": "legacy-form"}]
    for name, spec in _pods(objs).items():
        assert spec["imagePullSecrets"] == want, name
    for pod in chartkit.by_kind(objs, "Pod"):  # the helm test pods
        assert pod["spec"]["imagePullSecrets"] == want


def test_platform_knobs_reach_the_pods() -> None:
    objs = chartkit.manifests(PLATFORM)
    pods = _pods(objs)
    gpu = pods["lp-loraplane-worker-h100"]
    worker = gpu["containers"][0]
    spread = PLATFORM["workerPools"][0]["topologySpreadConstraints"]
    assert (gpu["runtimeClassName"], gpu["priorityClassName"]) == ("nvidia", "inference-high")
    assert gpu["serviceAccountName"] == "h100-workers"
    assert gpu["terminationGracePeriodSeconds"] == 120 and gpu["topologySpreadConstraints"] == spread
    assert gpu["securityContext"]["runAsUser"] == 2000
    assert [c["name"] for c in gpu["initContainers"]] == ["warm"]
    assert [c["name"] for c in gpu["containers"]] == ["worker", "log-shipper"]
    assert worker["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "10"]
    assert worker["envFrom"] == [{"secretRef": {"name": "h100-env"}}]
    # A probe override merges over the chart's probe; another handler replaces the chart's httpGet.
    assert worker["readinessProbe"] == {
        "httpGet": {"path": "/ready", "port": "http"},
        "periodSeconds": 2,
        "timeoutSeconds": 5,
        "failureThreshold": 2,
    }
    assert "httpGet" not in worker["livenessProbe"] and worker["livenessProbe"]["tcpSocket"] == {
        "port": "http"
    }
    for flag in (
        "--dtype=bfloat16",
        "--max-model-len=8192",
        "--mode=serve",
        "--log-format=json",
        "--access-log=off",
    ):
        assert flag in worker["args"], flag
    cpu = pods["lp-loraplane-worker-small-cpu"]["containers"][0]
    assert "--mode=control" in cpu["args"] and not any(a.startswith("--max-model-len") for a in cpu["args"])
    op = pods["lp-loraplane-operator"]
    assert op["topologySpreadConstraints"] == spread and "--log-format=json" in op["containers"][0]["args"]
    assert op["containers"][0]["livenessProbe"]["periodSeconds"] == 30
    pdb = next(
        p for p in chartkit.by_kind(objs, "PodDisruptionBudget") if "operator" in p["metadata"]["name"]
    )
    assert pdb["spec"]["minAvailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == "operator"


def test_inference_pools_validate_against_the_crd_schema() -> None:
    import celpy
    import jsonschema

    objs = chartkit.manifests(PLATFORM)
    pools = chartkit.by_kind(objs, "InferencePool")
    assert sorted(p["metadata"]["name"] for p in pools) == [
        "lp-loraplane-worker-h100",
        "lp-loraplane-worker-small-cpu",
    ]
    env = celpy.Environment()
    rule = env.program(env.compile(PORT_RULE))
    services = {s["metadata"]["name"]: s for s in chartkit.by_kind(objs, "Service")}
    workloads = {o["metadata"]["name"]: o for o in objs if o["kind"] in ("Deployment", "StatefulSet")}
    for pool in pools:
        assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
        jsonschema.Draft7Validator(INFERENCEPOOL_V1_SPEC).validate(pool["spec"])
        ref = {"kind": "Service", **pool["spec"]["endpointPickerRef"]}
        assert rule.evaluate({"self": celpy.json_to_cel(ref)}), ref
        # It selects exactly the pool's pods, on the port they serve.
        workload = workloads[pool["metadata"]["name"]]
        assert pool["spec"]["selector"]["matchLabels"] == workload["spec"]["selector"]["matchLabels"]
        container = workload["spec"]["template"]["spec"]["containers"][0]
        assert pool["spec"]["targetPorts"] == [{"number": container["ports"][0]["containerPort"]}]
        assert services[pool["metadata"]["name"]]  # the plain Service stays for clients without a gateway
    assert pools[0]["spec"]["endpointPickerRef"]["failureMode"] == "FailOpen"
    assert pools[0]["spec"]["endpointPickerRef"]["name"] == "lp-loraplane-worker-h100-epp"
    broken = copy.deepcopy(pools[0]["spec"])
    del broken["endpointPickerRef"]["port"]
    assert not rule.evaluate({"self": celpy.json_to_cel(broken["endpointPickerRef"])}), "the rule can fail"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(INFERENCEPOOL_V1_SPEC).validate({**broken, "targetPorts": []})


def test_pods_carry_the_engine_type_the_endpoint_picker_selects_metrics_by() -> None:
    """Both engines publish vLLM's series, so the picker's metrics mapping is "vllm" for both (llm-d's
    label and the Inference Extension's); the engine itself is in loraplane.io/engine. A pool's own
    podLabels win."""
    values = copy.deepcopy(PLATFORM)
    values["workerPools"][1] |= {"engine": "vllm", "podLabels": {"llm-d.ai/engine-type": "custom"}}
    objs = chartkit.manifests(values)
    labels = {
        o["metadata"]["name"]: o["spec"]["template"]["metadata"]["labels"]
        for o in objs
        if o["kind"] in ("Deployment", "StatefulSet") and "worker" in o["metadata"]["name"]
    }
    h100, cpu = labels["lp-loraplane-worker-h100"], labels["lp-loraplane-worker-small-cpu"]
    assert (h100["loraplane.io/engine"], h100["llm-d.ai/engine-type"]) == ("builtin", "vllm")
    assert h100["inference.networking.k8s.io/engine-type"] == "vllm" and h100["cost-center"] == "ml"
    assert (cpu["loraplane.io/engine"], cpu["llm-d.ai/engine-type"]) == ("vllm", "custom")


def test_body_based_routing_is_off_by_default_and_scoped_to_its_namespace() -> None:
    def bbr_objects(values: dict[str, Any]) -> tuple[list[str], list[dict[str, Any]]]:
        objs = chartkit.manifests(values)
        (op,) = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith("-operator")]
        args = [a for a in op["spec"]["template"]["spec"]["containers"][0]["args"] if a.startswith("--bbr")]
        return args, [o for o in objs if o["metadata"]["name"].endswith("-operator-bbr")]

    assert bbr_objects({}) == ([], [])
    args, objs = bbr_objects({"bodyBasedRouting": {"enabled": True}})
    assert args == [f"--bbr-namespace={chartkit.NAMESPACE}"]
    assert {(o["kind"], o["metadata"]["namespace"]) for o in objs} == {
        ("Role", chartkit.NAMESPACE),
        ("RoleBinding", chartkit.NAMESPACE),
    }
    args, objs = bbr_objects({"bodyBasedRouting": {"enabled": True, "namespace": "gateway"}})
    assert args == ["--bbr-namespace=gateway"] and {o["metadata"]["namespace"] for o in objs} == {"gateway"}
    (role,) = [o for o in objs if o["kind"] == "Role"]
    assert role["rules"] == [
        {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list", "create", "update", "delete"]}
    ]
    assert bbr_objects({"bodyBasedRouting": {"enabled": True}, "rbac": {"create": False}})[1] == []


def test_helm_test_hook_checks_a_running_pool(tmp_path: Path) -> None:
    """Run the rendered test Pod's command against a worker serving a tiny model on 127.0.0.1."""
    from loraplane.worker.api.webapp import ServeSettings, build_app, serve_in_thread
    from loraplane.worker.builtin.service import Engine, EngineSettings
    from loraplane.worker.inference.engines import EngineSlot
    from loraplane.worker.registry import Registry

    values = {
        "workerPools": [{"name": "tiny", "baseModel": {"source": "/models/tiny", "servedName": "tiny"}}]
    }
    pod = chartkit.by_kind(chartkit.manifests(values), "Pod")[0]
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    container = pod["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {
        "URL": "http://lp-loraplane-worker-tiny.loraplane.svc:8000",
        "MODEL": "tiny",
        "MODE": "serve",
    }

    def run(url: str, model: str = "tiny") -> subprocess.CompletedProcess[str]:
        command = [sys.executable if c == "python3" else c for c in container["command"]] + container["args"]
        return subprocess.run(
            command,
            env={**os.environ, **env, "URL": url, "MODEL": model},
            capture_output=True,
            text=True,
            timeout=120,
        )

    base = models.make_tiny_llama(tmp_path / "tiny")
    engine = Engine.load(base, EngineSettings(served_model_name="tiny", max_model_len=64))
    engine.run()
    try:
        with serve_in_thread(build_app(EngineSlot(engine), Registry(), ServeSettings())) as url:
            ok = run(url)
            assert ok.returncode == 0 and ok.stdout.startswith("ok:"), ok.stdout + ok.stderr
            wrong = run(url, model="other")
            assert wrong.returncode == 1 and "'other' is not listed" in wrong.stderr, wrong.stderr
    finally:
        engine.stop()
    down = run("http://127.0.0.1:9")  # nothing listens: the check fails, naming the call
    assert down.returncode == 1 and down.stderr.startswith("FAIL /v1/models"), down.stderr


def test_a_pools_placement_reaches_its_workers_flags() -> None:
    """workerPools[].placement is what the workers report to the operator (docs/operator.md, Placement);
    all 0 (the default) renders no flag: every worker holds every adapter."""
    values = copy.deepcopy(PLATFORM)
    values["workerPools"][0]["placement"] = {"defaultReplicas": 2, "maxReplicas": 4, "maxAdapters": 500}
    pods = _pods(chartkit.manifests(values))
    args = pods["lp-loraplane-worker-h100"]["containers"][0]["args"]
    flags = vars(worker_settings.build_parser().parse_args(args))  # the worker's own parser takes them
    assert (flags["default_replicas"], flags["max_replicas"], flags["max_adapters"]) == ("2", "4", "500")
    cpu = pods["lp-loraplane-worker-small-cpu"]["containers"][0]["args"]
    assert not [a for a in cpu if a.startswith(("--default-replicas", "--max-replicas", "--max-adapters"))]
