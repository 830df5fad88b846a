"""values.schema.json: the defaults pass, and each bad value is refused by Helm with a message that
names the key and what is wrong with it (the same text `helm install` prints)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from support import chartkit

POOL = {"name": "p", "baseModel": {"source": "org/model", "sizeBytes": 1_000_000_000}}


def _pool(**overrides: Any) -> dict[str, Any]:
    return {"workerPools": [{**POOL, **overrides}]}


# (case, values, fragments the error must contain)
BAD_VALUES: list[tuple[str, dict[str, Any], list[str]]] = [
    ("unknown top-level key", {"replicaCount": 2}, ["additional properties 'replicaCount' not allowed"]),
    (
        "typo in a pool key",
        _pool(replica=2),
        ["/workerPools/0", "additional properties 'replica' not allowed"],
    ),
    (
        "pool without baseModel",
        {"workerPools": [{"name": "p"}]},
        ["/workerPools/0", "missing property 'baseModel'"],
    ),
    ("pool name not a DNS label", _pool(name="GPU_pool"), ["/workerPools/0/name", "does not match pattern"]),
    ("pool name too long", _pool(name="p" * 31), ["/workerPools/0/name", "maxLength"]),
    ("negative replicas", _pool(replicas=-1), ["/workerPools/0/replicas", "minimum: got -1, want 0"]),
    ("replicas as a string", _pool(replicas="2"), ["/workerPools/0/replicas", "got string, want integer"]),
    ("unknown device", _pool(device="tpu"), ["/workerPools/0/device", "'cuda'", "'cpu'", "'auto'"]),
    ("zero device slots", _pool(maxLoras=0), ["/workerPools/0/maxLoras", "minimum: got 0, want 1"]),
    (
        "rank above limit",
        _pool(maxLoraRank=4096),
        ["/workerPools/0/maxLoraRank", "maximum: got 4,096, want 1,024"],
    ),
    (
        "relative local root",
        _pool(localRoots=["models"]),
        ["/workerPools/0/localRoots/0", "does not match pattern"],
    ),
    (
        "unknown cache type",
        _pool(cache={"type": "hostPath"}),
        ["/workerPools/0/cache/type", "'emptyDir'", "'pvc'"],
    ),
    ("bad cache size", _pool(cache={"sizeLimit": "50 gigs"}), ["/workerPools/0/cache/sizeLimit"]),
    ("tiny byte budget", _pool(cache={"budgetBytes": 10}), ["/workerPools/0/cache/budgetBytes", "minimum"]),
    (
        "bad PVC access mode",
        _pool(cache={"pvc": {"accessModes": ["RWO"]}}),
        ["/workerPools/0/cache/pvc/accessModes/0", "'ReadWriteOnce'"],
    ),
    (
        "bad GPU quantity",
        _pool(resources={"limits": {"nvidia.com/gpu": "one"}}),
        ["/workerPools/0/resources/limits/nvidia.com~1gpu"],
    ),
    ("resources typo", _pool(resources={"limit": {"cpu": 1}}), ["additional properties 'limit' not allowed"]),
    (
        "bad PDB percentage",
        _pool(podDisruptionBudget={"enabled": True, "maxUnavailable": "half"}),
        ["/workerPools/0/podDisruptionBudget/maxUnavailable"],
    ),
    (
        "image tag with a space",
        {"operator": {"image": {"tag": "v1 beta"}}},
        ["/operator/image/tag", "does not match pattern"],
    ),
    (
        "image digest not sha256",
        {"worker": {"image": {"digest": "md5:abc"}}},
        ["/worker/image/digest", "does not match pattern"],
    ),
    (
        "unknown pull policy",
        {"operator": {"image": {"pullPolicy": "Sometimes"}}},
        ["/operator/image/pullPolicy", "'IfNotPresent'"],
    ),
    ("port out of range", {"operator": {"metricsPort": 70000}}, ["/operator/metricsPort", "maximum"]),
    ("unknown log level", {"worker": {"logLevel": "verbose"}}, ["/worker/logLevel", "'debug'"]),
    (
        "watch namespace not a DNS label",
        {"watch": {"clusterWide": False, "namespaces": ["Team_A"]}},
        ["/watch/namespaces/0", "does not match pattern"],
    ),
    (
        "clusterWide as a string",
        {"watch": {"clusterWide": "yes"}},
        ["/watch/clusterWide", "got string, want boolean"],
    ),
    (
        "hf endpoint not a URL",
        {"worker": {"hfEndpoint": "hub.local"}},
        ["/worker/hfEndpoint", "does not match"],
    ),
    (
        "scrape interval without unit",
        {"metrics": {"serviceMonitor": {"interval": "30"}}},
        ["/metrics/serviceMonitor/interval", "does not match pattern"],
    ),
]

_HUB = {"source": "org/model"}
_GPUS = {"limits": {"nvidia.com/gpu": 2, "memory": "64Gi"}, "requests": {"nvidia.com/gpu": 2}}

# Checks the schema cannot express; the chart's templates `fail` with these messages.
BAD_COMBINATIONS: list[tuple[str, dict[str, Any], list[str]]] = [
    (
        "cache budget above the emptyDir",
        _pool(cache={"sizeLimit": "10Gi", "budgetBytes": 20_000_000_000}),
        [
            "workerPools[0] (p): cache.budgetBytes (20000000000)",
            "above cache.sizeLimit 10Gi (10737418240 bytes)",
        ],
    ),
    (
        "budget plus the base model download above the volume",
        _pool(
            cache={"sizeLimit": "50Gi", "budgetBytes": 40_000_000_000},
            baseModel={**_HUB, "sizeBytes": 15_000_000_000},
        ),
        ["plus the base model download (baseModel.sizeBytes 15000000000) is 55000000000 bytes", "50Gi"],
    ),
    (
        "cache budget above the PVC",
        _pool(cache={"type": "pvc", "budgetBytes": 2_000_000_000_000, "pvc": {"size": "1.5Ti"}}),
        ["above cache.pvc.size 1.5Ti (1649267441664 bytes)", "raise cache.pvc.size"],
    ),
    (
        "hub base model with no size",
        _pool(baseModel=_HUB),
        ['baseModel.sizeBytes is required for the Hub source "org/model"'],
    ),
    (
        "two GPUs on the built-in engine",
        _pool(resources=_GPUS),
        ["workerPools[0] (p): asks for 2 GPUs, but the builtin engine runs on one device", "engine: vllm"],
    ),
    (
        "a tool parser on the built-in engine",
        _pool(toolCallParser="hermes"),
        ['workerPools[0] (p): toolCallParser "hermes" needs engine: vllm'],
    ),
    ("duplicate pool names", {"workerPools": [POOL, POOL]}, ['workerPools[1].name "p" is used twice']),
    (
        "maxCpuLoras below maxLoras",
        _pool(maxLoras=8, maxCpuLoras=4),
        ["workerPools[0] (p): maxCpuLoras (4) must be >= maxLoras (8)"],
    ),
    (
        "namespaces while cluster-wide",
        {"watch": {"clusterWide": True, "namespaces": ["a"]}},
        ["watch.namespaces is set but watch.clusterWide is true"],
    ),
    (
        "existing service account without a name",
        {"operator": {"serviceAccount": {"create": False}}},
        ["operator.serviceAccount.name is required"],
    ),
]


def _install_error(values: dict[str, Any]) -> str:
    """What `helm install --dry-run=client` says about these values (the path users take)."""
    import helm_python

    with helm_python.Config(namespace=chartkit.NAMESPACE, storage_driver="memory") as cfg:
        try:
            cfg.install(
                chartkit.CHART, chartkit.RELEASE, values, dry_run="client", namespace=chartkit.NAMESPACE
            )
        except helm_python.HelmError as e:
            return str(e)
    pytest.fail(f"helm install accepted bad values: {values}")


@pytest.mark.parametrize(("case", "values", "fragments"), BAD_VALUES, ids=[c[0] for c in BAD_VALUES])
def test_schema_refuses_bad_values(case: str, values: dict[str, Any], fragments: list[str]) -> None:
    message = _install_error(values)
    assert "values don't meet the specifications of the schema" in message
    for fragment in fragments:
        assert fragment in message, f"{case}: {fragment!r} not in:\n{message}"


@pytest.mark.parametrize(
    ("case", "values", "fragments"), BAD_COMBINATIONS, ids=[c[0] for c in BAD_COMBINATIONS]
)
def test_templates_refuse_bad_combinations(case: str, values: dict[str, Any], fragments: list[str]) -> None:
    message = _install_error(values)
    for fragment in fragments:
        assert fragment in message, f"{case}: {fragment!r} not in:\n{message}"


def test_default_values_match_the_schema() -> None:
    """values.yaml and values.schema.json stay in step: Helm's validator and a plain draft-07 one agree."""
    import helm_python
    import jsonschema

    schema = json.loads((chartkit.CHART / "values.schema.json").read_text())
    defaults = yaml.safe_load((chartkit.CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    jsonschema.Draft7Validator(schema).validate(defaults)
    with helm_python.Chart.load(chartkit.CHART) as chart:
        chart.validate_schema(defaults)
        assert chart.values == defaults
    # Every default key is described by the schema (additionalProperties false would refuse it otherwise,
    # but a schema that allowed anything would pass the check above too).
    assert schema["additionalProperties"] is False
    # global and enabled are what a parent chart passes to a subchart; values.yaml does not set them.
    assert set(defaults) == set(schema["properties"]) - {"global", "enabled"}


@pytest.mark.parametrize("name", sorted(chartkit.VALUE_SETS))
def test_value_sets_install_dry_run(name: str) -> None:
    import helm_python

    with helm_python.Config(namespace=chartkit.NAMESPACE, storage_driver="memory") as cfg:
        release = cfg.install(
            chartkit.CHART,
            chartkit.RELEASE,
            chartkit.VALUE_SETS[name],
            dry_run="client",
            namespace=chartkit.NAMESPACE,
        )
    assert "kind: CustomResourceDefinition" not in release["manifest"]  # CRDs come from crds/, not templates
    assert "kubectl get lora -A" in release["notes"]


@pytest.mark.parametrize(
    ("case", "pool"),
    [
        (
            "budget fits a decimal-exponent volume",
            {"cache": {"sizeLimit": "60e9", "budgetBytes": 40_000_000_000}},
        ),
        (
            "a directory source takes no cache space",
            {
                "baseModel": {"source": "/models/m"},
                "cache": {"sizeLimit": "40G", "budgetBytes": 40_000_000_000},
            },
        ),
        ("one GPU", {"resources": {"limits": {"nvidia.com/gpu": 1}}}),
        (
            "four GPUs with tensor parallelism",
            {"engine": "vllm", "resources": {"limits": {"nvidia.com/gpu": 4}}},
        ),
    ],
)
def test_templates_accept_what_fits(case: str, pool: dict[str, Any]) -> None:
    assert chartkit.manifests(_pool(**pool)), case


def test_every_value_has_a_description() -> None:
    """Editors (the YAML language server, IDEs) show these; the chart README is generated from them."""
    schema = json.loads((chartkit.CHART / "values.schema.json").read_text())
    missing: list[str] = []

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, dict):
            return
        if {"type", "$ref", "oneOf"} & node.keys() and not node.get("description"):
            missing.append(path or "/")
        for key, child in (node.get("properties") or {}).items():
            walk(child, f"{path}/{key}")
        for key in ("items", "additionalProperties"):
            walk(node.get(key), f"{path}/{key}")
        for key, child in (node.get("definitions") or {}).items():
            walk(child, f"#/definitions/{key}")

    walk(schema, "")
    assert not missing, missing


def test_pool_defaults_accept_every_pool_key() -> None:
    """workerPoolDefaults repeats the pool schema (JSON Schema cannot say "these, none required" once)."""
    schema = json.loads((chartkit.CHART / "values.schema.json").read_text())
    pool = schema["definitions"]["workerPool"]["properties"]
    defaults = schema["properties"]["workerPoolDefaults"]["properties"]
    assert defaults == {k: v for k, v in pool.items() if k not in ("name", "baseModel")}


def test_gpus_become_the_tensor_parallel_size() -> None:
    one = _pool(resources={"limits": {"nvidia.com/gpu": 1}})
    four = _pool(
        engine="vllm", resources={"limits": {"nvidia.com/gpu": 4}, "requests": {"nvidia.com/gpu": 4}}
    )
    for values, flags in ((one, []), (four, ["--tensor-parallel-size=4"])):
        (deployment,) = [
            o
            for o in chartkit.by_kind(chartkit.manifests(values), "Deployment")
            if "worker" in o["metadata"]["name"]
        ]
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert [a for a in args if a.startswith("--tensor-parallel-size")] == flags


def test_tool_call_parser_reaches_the_vllm_worker() -> None:
    for values, flags in (
        (_pool(engine="vllm"), []),
        (_pool(engine="vllm", toolCallParser="hermes"), ["--tool-call-parser=hermes"]),
    ):
        (deployment,) = [
            o
            for o in chartkit.by_kind(chartkit.manifests(values), "Deployment")
            if "worker" in o["metadata"]["name"]
        ]
        args = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        assert [a for a in args if a.startswith("--tool-call-parser")] == flags
