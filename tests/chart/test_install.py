"""`helm install` of the chart into the API server (the local one by default, a real cluster with
--kubeconfig), through Helm's Go SDK: CRDs from crds/, then every template, server-side applied.
Every rendered object must then be readable from the server as Helm sent it, and uninstall removes them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import chartkit


def _standin_crd(group: str, kind: str, plural: str, version: str = "v1") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": f"{plural}.{group}"}
    if group.endswith((".k8s.io", ".kubernetes.io")):
        # kube-apiserver refuses a CRD in a protected group without it (its real CRD carries a URL).
        meta["annotations"] = {"api-approved.kubernetes.io": "unapproved, loraplane's test stand-in"}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": meta,
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": version,
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
                    },
                }
            ],
        },
    }


# The Prometheus Operator's and the Gateway API Inference Extension's CRDs are not ours to ship;
# stand-ins let ServiceMonitors, PrometheusRules and InferencePools be applied (test_platform.py checks
# the InferencePool against the real CRD's schema).
STANDIN_CRDS: list[dict[str, Any]] = [
    _standin_crd("monitoring.coreos.com", "ServiceMonitor", "servicemonitors"),
    _standin_crd("monitoring.coreos.com", "PrometheusRule", "prometheusrules"),
    _standin_crd("inference.networking.k8s.io", "InferencePool", "inferencepools"),
]


@pytest.fixture(scope="module")
def cluster_prereqs(kube: Any) -> Iterator[None]:
    """What a value set needs besides the chart: the namespaces it watches and the CRDs of the kinds it
    renders that are not ours. Only what is missing is created, and removed again afterwards: the
    cluster is left as it was."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    wanted = sorted(
        {ns for v in chartkit.VALUE_SETS.values() for ns in v.get("watch", {}).get("namespaces", [])}
    )
    created: list[str] = []
    own_crds = [
        c for c in STANDIN_CRDS if not _has_crd(kube, c["metadata"]["name"])
    ]  # never replace real ones
    with kube.api_client() as api:
        core, ext = client.CoreV1Api(api), client.ApiextensionsV1Api(api)
        try:
            for name in wanted:
                try:
                    core.create_namespace({"metadata": {"name": name}})
                    created.append(name)
                except ApiException as e:
                    if e.status != 409:
                        raise
            files = []
            for crd in own_crds:
                files.append(Path(kube._cache_dir()) / f"{crd['metadata']['name']}.yaml")
                files[-1].write_text(yaml.safe_dump(crd))
            if files:
                kube.apply_crds(files)
            yield
        finally:
            for name in created:
                kube.delete_namespace(name, wait=60)
            for crd in own_crds:
                ext.delete_custom_resource_definition(crd["metadata"]["name"])


def _has_crd(kube: Any, name: str) -> bool:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    with kube.api_client() as api:
        try:
            client.ApiextensionsV1Api(api).read_custom_resource_definition(name)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
    return True


def _read(kube: Any, obj: dict[str, Any]) -> dict[str, Any]:
    from kubernetes import dynamic

    with kube.api_client() as api:
        resource = dynamic.DynamicClient(api).resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
        ns = obj["metadata"].get("namespace")
        return resource.get(name=obj["metadata"]["name"], namespace=ns).to_dict()


@pytest.mark.parametrize("name", sorted(chartkit.VALUE_SETS))
def test_helm_install_and_uninstall(kube: Any, namespace: str, name: str, cluster_prereqs: None) -> None:
    import helm_python
    from kubernetes.client.rest import ApiException

    values = chartkit.VALUE_SETS[name]
    release = f"lp-{name}"[:53]
    kube.apply_crds(
        [chartkit.CHART / "crds" / p.name for p in sorted((chartkit.CHART / "crds").glob("*.yaml"))]
    )
    with helm_python.Chart.load(chartkit.CHART) as chart:
        expected = [
            doc
            for path, text in sorted(
                chart.render(values, name=release, namespace=namespace, is_install=True).items()
            )
            if not path.endswith("NOTES.txt")
            for doc in yaml.safe_load_all(text)
            # `helm test` hooks are rendered but not installed.
            if doc and "test" not in (doc["metadata"].get("annotations") or {}).get("helm.sh/hook", "")
        ]
    # Release records live in memory: this test is about the chart's objects, not Helm's storage (and the local
    # server cannot yet decode the protobuf DeleteOptions Helm sends when it purges a Secret-stored release).
    with helm_python.Config(
        kubeconfig_path=kube.kubeconfig, namespace=namespace, storage_driver="memory"
    ) as cfg:
        result = cfg.install(chartkit.CHART, release, values, namespace=namespace, timeout=60)
        assert result["status"] == "deployed", result
        try:
            for obj in expected:
                live = _read(kube, obj)
                assert live["metadata"]["labels"]["app.kubernetes.io/instance"] == release
                for key in ("spec", "rules", "roleRef", "subjects"):
                    if key in obj:
                        # The server may default fields; everything the chart set must be there as set.
                        _assert_subset(obj[key], live[key], f"{obj['kind']}/{obj['metadata']['name']}.{key}")
        finally:
            cfg.uninstall(release)
    for obj in expected:
        with pytest.raises(ApiException) as gone:
            _read(kube, obj)
        assert gone.value.status == 404, f"{obj['kind']}/{obj['metadata']['name']} left after uninstall"


def _assert_subset(want: Any, got: Any, where: str) -> None:
    if isinstance(want, dict):
        assert isinstance(got, dict), where
        for k, v in want.items():
            assert k in got, f"{where}.{k} missing on the server"
            _assert_subset(v, got[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (w, g) in enumerate(zip(want, got, strict=True)):
            _assert_subset(w, g, f"{where}[{i}]")
    else:
        assert want == got or str(want) == str(got), f"{where}: {want!r} != {got!r}"
