"""Shared pieces of the chart tests: render the chart with Helm's own engine, and the value sets.

Rendering goes through helm-python-sdk (Helm's Go SDK behind a C ABI): the same template engine,
schema validation and lint as the `helm` binary, offline.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "loraplane"
RELEASE = "lp"
NAMESPACE = "loraplane"
# The oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and a recent one.
K8S_VERSIONS = ("1.27.0", "1.32.0")

_CPU_POOL: dict[str, Any] = {
    "name": "small-cpu",
    "baseModel": {"source": "/models/tiny-llama", "servedName": "tiny-llama"},
    "image": {"repository": "ghcr.io/loraplane/loraplane-worker-cpu", "tag": "0.1.0-rc1"},
    "replicas": 2,
    "device": "cpu",
    "maxLoras": 4,
    "maxLoraRank": 16,
    "maxCpuLoras": 8,
    "localRoots": ["/models/adapters"],
    "resources": {"requests": {"cpu": "2", "memory": "4Gi"}, "limits": {"memory": "8Gi"}},
    "tolerations": [],
    "nodeSelector": {"kubernetes.io/arch": "amd64"},
    "affinity": {
        "podAntiAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 100,
                    "podAffinityTerm": {
                        "topologyKey": "kubernetes.io/hostname",
                        "labelSelector": {"matchLabels": {"loraplane.io/pool": "small-cpu"}},
                    },
                }
            ]
        }
    },
    "extraEnv": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
    "extraVolumes": [{"name": "models", "persistentVolumeClaim": {"claimName": "models"}}],
    "extraVolumeMounts": [{"name": "models", "mountPath": "/models", "readOnly": True}],
    "service": {"type": "ClusterIP", "port": 8080},
}

_SPREAD: dict[str, Any] = {
    "maxSkew": 1,
    "topologyKey": "topology.kubernetes.io/zone",
    "whenUnsatisfiable": "ScheduleAnyway",
    "labelSelector": {"matchLabels": {"app.kubernetes.io/name": "loraplane"}},
}

# name -> values overriding the defaults. Each one exercises a different branch of the templates.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "two-pools": {
        "worker": {
            "hfToken": {"secretName": "hf-token"},
            "s3": {
                "secretName": "s3-creds",
                "endpointUrl": "http://minio.storage:9000",
                "region": "us-east-1",
            },
        },
        "workerPools": [
            {
                "name": "llama-7b",
                "baseModel": {
                    "source": "meta-llama/Llama-2-7b-hf",
                    "servedName": "llama-2-7b",
                    "sizeBytes": 13_500_000_000,
                },
                "replicas": 3,
                "resources": {"limits": {"nvidia.com/gpu": 1, "memory": "48Gi"}},
                "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            },
            _CPU_POOL,
        ],
    },
    "pvc-cache": {
        "workerPools": [
            {
                "name": "persistent",
                "baseModel": {"source": "meta-llama/Llama-2-7b-hf", "sizeBytes": 13_500_000_000},
                "replicas": 2,
                "cache": {
                    "type": "pvc",
                    "budgetBytes": 90_000_000_000,
                    "pvc": {
                        "size": "200Gi",
                        "storageClassName": "fast-ssd",
                        "accessModes": ["ReadWriteOnce"],
                    },
                },
            }
        ]
    },
    "namespaced": {
        "watch": {"clusterWide": False, "namespaces": ["team-a", "team-b"]},
        "operator": {"replicas": 2, "image": {"digest": "sha256:" + "ab" * 32}},
    },
    "extras": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
        "networkPolicy": {
            "enabled": True,
            "apiClients": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "gateway"}}}
            ],
            "metricsScrapers": [
                {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
            ],
        },
        "workerPools": [
            {
                "name": "default",
                "baseModel": {"source": "meta-llama/Llama-2-7b-hf", "sizeBytes": 13_500_000_000},
                "replicas": 4,
                "podDisruptionBudget": {"enabled": True, "minAvailable": "50%"},
            },
            {**copy.deepcopy(_CPU_POOL), "podDisruptionBudget": {"enabled": True, "maxUnavailable": 1}},
        ],
        "commonLabels": {"team": "ml-platform"},
    },
    "platform": {  # what a platform team sets: every knob of a real install, as a subchart would get it
        "global": {"imagePullSecrets": [{"name": "org-pull"}]},
        "enabled": True,
        "imagePullSecrets": [{"name": "regcred"}, "legacy-form"],
        "metrics": {
            "serviceMonitor": {"enabled": True},
            "prometheusRule": {"enabled": True, "labels": {"release": "prometheus"}},
            "grafanaDashboard": {"enabled": True, "annotations": {"grafana_folder": "LLM"}},
        },
        "operator": {
            "replicas": 2,
            "logFormat": "json",
            "podDisruptionBudget": {"enabled": True, "minAvailable": 1},
            "topologySpreadConstraints": [_SPREAD],
            "livenessProbe": {"periodSeconds": 30},
            "extraEnvFrom": [{"configMapRef": {"name": "operator-env"}}],
        },
        "worker": {"logFormat": "json", "accessLog": False},
        "workerPools": [
            {
                "name": "h100",
                "baseModel": {"source": "/models/llama-3-8b", "servedName": "llama-3-8b"},
                "replicas": 2,
                "dtype": "bfloat16",
                "maxModelLen": 8192,
                "runtimeClassName": "nvidia",
                "priorityClassName": "inference-high",
                "serviceAccountName": "h100-workers",
                "topologySpreadConstraints": [_SPREAD],
                "terminationGracePeriodSeconds": 120,
                "lifecycle": {"preStop": {"exec": {"command": ["sleep", "10"]}}},
                "readinessProbe": {"periodSeconds": 2, "failureThreshold": 2},
                "livenessProbe": {"tcpSocket": {"port": "http"}},
                "extraEnvFrom": [{"secretRef": {"name": "h100-env"}}],
                "initContainers": [{"name": "warm", "image": "busybox:1.36", "command": ["true"]}],
                "sidecars": [{"name": "log-shipper", "image": "fluent/fluent-bit:3.0"}],
                "podAnnotations": {"cluster-autoscaler.kubernetes.io/safe-to-evict": "false"},
                "podLabels": {"cost-center": "ml"},
                "podSecurityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 2000,
                    "fsGroup": 2000,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "inferencePool": {"enabled": True, "endpointPicker": {"failureMode": "FailOpen"}},
                "cache": {"sizeLimit": "200Gi", "budgetBytes": 150_000_000_000},
            },
            {**copy.deepcopy(_CPU_POOL), "mode": "control", "inferencePool": {"enabled": True}},
        ],
    },
    "operator-only": {"workerPools": []},
    "workers-only": {"operator": {"enabled": False}},
}


def render(values: dict[str, Any] | None = None, namespace: str = NAMESPACE) -> dict[str, str]:
    """Template path -> rendered text, through Helm's engine (schema validation included)."""
    import helm_python

    with helm_python.Chart.load(CHART) as chart:
        return chart.render(values or {}, name=RELEASE, namespace=namespace, is_install=True)


def manifests(values: dict[str, Any] | None = None, namespace: str = NAMESPACE) -> list[dict[str, Any]]:
    """Every rendered Kubernetes object (NOTES.txt and empty documents left out)."""
    out: list[dict[str, Any]] = []
    for path, text in sorted(render(values, namespace).items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                out.append(doc)
    return out


def by_kind(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]


def chart_crds() -> list[dict[str, Any]]:
    return [
        d for f in sorted((CHART / "crds").glob("*.yaml")) for d in yaml.safe_load_all(f.read_text()) if d
    ]
