"""RBAC proven, not asserted: the operator and a worker run as real processes against an API server that
records every call with the caller's identity (a bearer token per service account), through an
end-to-end flow; then each identity's calls are compared with the rules the chart renders for its
service account. A call no rule allows fails the test, and so does a rule nothing used (surplus).

Both modes are checked: cluster-wide (ClusterRoles) and namespaced (Roles in the watched namespaces).
The processes run with the arguments the chart's Deployments give them; only paths, ports and the
kubeconfig are swapped for local ones.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import chartkit, fleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

NS = chartkit.NAMESPACE  # the release namespace: operator, workers, ledger, LoRAWorker objects
TEAM = "team-a"  # where users put their adapters
SERVED = "tiny-llama"
OPERATOR_SA = f"system:serviceaccount:{NS}:lp-loraplane-operator"
WORKER_SA = f"system:serviceaccount:{NS}:lp-loraplane-worker"
TOKENS = {"operator-token": OPERATOR_SA, "worker-token": WORKER_SA}

MODES: dict[str, dict[str, Any]] = {
    "cluster-wide": {"watch": {"clusterWide": True}},
    "namespaced": {"watch": {"clusterWide": False, "namespaces": [TEAM]}},
}


@dataclass(frozen=True)
class Call:
    """One API call as an authorizer sees it. namespace "" is a cluster-scoped or all-namespaces call."""

    verb: str
    group: str
    resource: str  # "resource" or "resource/subresource"
    namespace: str


@dataclass(frozen=True)
class Grant:
    """One verb on one resource from one rule, in one scope (namespace, or None for cluster-wide)."""

    verb: str
    group: str
    resource: str
    scope: str | None
    source: str  # Kind/name of the role, for messages

    def allows(self, call: Call) -> bool:
        return (
            self.verb == call.verb
            and self.group == call.group
            and self.resource == call.resource
            and (self.scope is None or self.scope == call.namespace)
        )


def grants_for(objs: list[dict[str, Any]], service_account: str, namespace: str) -> list[Grant]:
    """Every (verb, group, resource, scope) the rendered chart grants one service account."""
    roles = {(o["kind"], o["metadata"].get("namespace", ""), o["metadata"]["name"]): o for o in objs}
    out: list[Grant] = []
    for binding in objs:
        if binding["kind"] not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(
            s["kind"] == "ServiceAccount" and s["name"] == service_account and s["namespace"] == namespace
            for s in binding["subjects"]
        ):
            continue
        ref = binding["roleRef"]
        role_ns = "" if ref["kind"] == "ClusterRole" else binding["metadata"]["namespace"]
        role = roles[(ref["kind"], role_ns, ref["name"])]
        scope = None if binding["kind"] == "ClusterRoleBinding" else binding["metadata"]["namespace"]
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"], f"wildcard in {ref['name']}"
            assert not rule.get("resourceNames"), "resourceNames are not modelled by this test"
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        out.append(Grant(verb, group, resource, scope, f"{ref['kind']}/{ref['name']}"))
    return out


def calls_by(server: Any, user: str) -> set[Call]:
    return {
        Call(
            e.verb, e.api_group, f"{e.resource}/{e.subresource}" if e.subresource else e.resource, e.namespace
        )
        for e in list(server.audit_log)
        if e.user == user
    }


def compare(calls: set[Call], grants: list[Grant], who: str) -> list[str]:
    problems = []
    for call in sorted(calls, key=str):
        if not any(g.allows(call) for g in grants):
            problems.append(f"{who}: {call} is not allowed by the chart's RBAC (missing rule)")
    for grant in grants:
        if not any(grant.allows(call) for call in calls):
            problems.append(f"{who}: {grant} was never used (surplus rule)")
    return problems


# --- the flow --------------------------------------------------------------------------------------


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args, self.env, self.log_path = args, env, log
        self.start()

    def start(self) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.args, stdout=out, stderr=subprocess.STDOUT, env=self.env)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def log(self) -> str:
        return f"(exit code {self.proc.poll()})\n" + self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            return -9


def _container(objs: list[dict[str, Any]], name_suffix: str) -> dict[str, Any]:
    (d,) = [o for o in objs if o["kind"] == "Deployment" and o["metadata"]["name"].endswith(name_suffix)]
    return d["spec"]["template"]["spec"]["containers"][0]


def _replace(args: list[str], values: dict[str, str]) -> list[str]:
    """Swap --flag=value for the flags in `values` (in-cluster paths and ports -> local ones)."""
    out = [a for a in args if a.split("=", 1)[0] not in values]
    return out + [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from loraplane.tinymodels import make_peft_adapter, make_tiny_llama

    root = tmp_path_factory.mktemp("rbac-models")
    base = make_tiny_llama(root / "base")
    adapters = root / "adapters"
    for i, name in enumerate(("a", "b", "c")):
        make_peft_adapter(base, adapters / name, r=4, alpha=8, seed=i)
    return {"base": base, "adapters": adapters}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Any, str, dict[str, str]]]:
    from loraplane.localkube import LocalKube, write_kubeconfig

    srv = LocalKube(tokens=TOKENS)
    url = srv.start()
    admin = str(write_kubeconfig(url, tmp_path / "admin.kubeconfig"))
    per_user = {
        user: str(write_kubeconfig(url, tmp_path / f"{user.rsplit(':', 1)[-1]}.kubeconfig", token=token))
        for token, user in TOKENS.items()
    }
    try:
        yield srv, admin, per_user
    finally:
        srv.stop()


def _admin_setup(admin_kubeconfig: str, objs: list[dict[str, Any]], pod_name: str) -> None:
    """As the cluster admin: CRDs, namespaces, the chart's objects, and the worker's Pod (no kubelet here)."""
    from kubernetes import client, config, dynamic

    api = config.new_client_from_config(config_file=admin_kubeconfig)
    with api:
        ext = client.ApiextensionsV1Api(api)
        for crd in chartkit.chart_crds():
            ext.create_custom_resource_definition(crd)
        deadline = time.monotonic() + 30
        for crd in chartkit.chart_crds():
            while True:
                conds = (ext.read_custom_resource_definition(crd["metadata"]["name"]).status.conditions) or []
                if any(c.type == "Established" and c.status == "True" for c in conds):
                    break
                assert time.monotonic() < deadline, "CRDs not Established"
                time.sleep(0.1)
        core = client.CoreV1Api(api)
        for ns in (NS, TEAM):
            core.create_namespace({"metadata": {"name": ns}})
        dyn = dynamic.DynamicClient(api)
        for obj in objs:
            resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
            resource.create(body=obj, namespace=obj["metadata"].get("namespace"))
        (worker,) = [o for o in objs if o["kind"] == "Deployment" and "-worker-" in o["metadata"]["name"]]
        template = worker["spec"]["template"]
        dyn.resources.get(api_version="v1", kind="Pod").create(
            namespace=NS,
            body={
                "metadata": {"name": pod_name, "labels": template["metadata"]["labels"]},
                "spec": {**template["spec"], "nodeName": "node-1"},
            },
        )


@pytest.mark.parametrize("mode", sorted(MODES))
def test_chart_rbac_is_exactly_what_the_components_use(
    mode: str, server: tuple[Any, str, dict[str, str]], tiny: dict[str, Path], tmp_path: Path
) -> None:
    srv, admin, kubeconfigs = server
    values = {
        **MODES[mode],
        # Small ID blocks, so that the flow reserves a second block (the ledger's CAS update) too.
        # Frequent liveness ticks, so that the pod check of each worker report happens within the flow.
        "operator": {"extraArgs": ["--block-size=2", "--liveness-interval=0.5"]},
        "workerPools": [
            {"name": "tiny", "baseModel": {"source": "/models/tiny", "servedName": SERVED}, "device": "cpu"}
        ],
    }
    objs = chartkit.manifests(values)
    pod_name = "lp-loraplane-worker-tiny-0"
    _admin_setup(admin, objs, pod_name)
    flow_start = len(srv.audit_log)

    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECONFIG", "LORAPLANE_"))}
    bin_dir = Path(sys.executable).parent

    op_container = _container(objs, "-operator")
    op_port, health_port = fleet.free_port(), fleet.free_port()
    op_args = _replace(
        op_container["args"],
        {"--metrics-port": str(op_port), "--health-port": str(health_port), "--metrics-address": "127.0.0.1"},
    )
    operator = Proc(
        [str(bin_dir / "loraplane-operator"), *op_args, "--kubeconfig", kubeconfigs[OPERATOR_SA]],
        {**base_env, "POD_NAME": "lp-loraplane-operator-0", "POD_NAMESPACE": NS},
        tmp_path / "operator.log",
    )
    port = fleet.free_port()
    wk_args = _replace(
        _container(objs, "-worker-tiny")["args"],
        {
            "--base-model": str(tiny["base"]),
            "--cache-dir": str(tmp_path / "cache"),
            "--local-roots": str(tiny["adapters"]),
            "--port": str(port),
            "--endpoint": f"http://127.0.0.1:{port}",
            "--host": "127.0.0.1",
            "--heartbeat-seconds": "1",
            "--report-batch-seconds": "0.1",
        },
    )
    worker = Proc(
        [str(bin_dir / "loraplane-worker"), *wk_args, "--kubeconfig", kubeconfigs[WORKER_SA]],
        {
            **base_env,
            "POD_NAME": pod_name,
            "POD_NAMESPACE": NS,
            "NODE_NAME": "node-1",
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_OFFLINE": "1",
        },
        tmp_path / "worker.log",
    )
    logs = lambda: f"operator log:\n{operator.log()}\nworker log:\n{worker.log()}"  # noqa: E731
    adapters = fleet.Adapters(_AdminKube(admin), TEAM)
    try:
        root = tiny["adapters"]
        adapters.create(fleet.adapter_obj("alpha", str(root / "a")))
        adapters.create(fleet.adapter_obj("beta", str(root / "b")))
        adapters.create(fleet.adapter_obj("broken", str(root / "missing")))

        def phase(name: str) -> str:
            return (adapters.get(name).get("status") or {}).get("phase", "")

        fleet.wait_for(lambda: phase("alpha") == "Ready" and phase("beta") == "Ready", 90, logs)
        fleet.wait_for(lambda: phase("broken") in ("Failed", "Degraded"), 60, logs)
        _probes_answer(op_container, {"metrics": op_port, "health": health_port})
        _probes_answer(_container(objs, "-worker-tiny"), {"http": port})
        old_id = adapters.get("beta")["status"]["id"]
        adapters.patch_spec("beta", {"path": str(root / "c")})  # a new version: a new ID
        fleet.wait_for(
            lambda: adapters.get("beta")["status"].get("id") != old_id and phase("beta") == "Ready", 60, logs
        )
        time.sleep(1.5)  # a few operator ticks: each checks the worker's pod
        adapters.delete("alpha")
        fleet.wait_for(lambda: "alpha" not in {a["metadata"]["name"] for a in _list(adapters)}, 30, logs)
        # A container restart in the same pod: its LoRAWorker object is still there.
        worker.kill()
        worker.start()
        fleet.wait_for(lambda: worker.log_path.read_text().count("ready to report") >= 2, 60, logs)
        fleet.wait_for(lambda: phase("beta") == "Ready" and phase("broken") == "Failed", 60, logs)
        assert worker.stop() == 0, logs()
        time.sleep(2)  # let the operator see the worker go
    finally:
        worker.stop()
        operator.stop()
        adapters.close()

    # The test's own admin calls touch only adapters in TEAM; any other call without credentials comes from
    # a component that does not send its service-account token (it would get 403 on a real cluster).
    anonymous = sorted(
        {
            str(
                Call(
                    e.verb,
                    e.api_group,
                    f"{e.resource}/{e.subresource}" if e.subresource else e.resource,
                    e.namespace,
                )
            )
            for e in list(srv.audit_log)[flow_start:]
            if e.user == "admin"
            and not (e.resource == "loraadapters" and e.namespace == TEAM and not e.subresource)
        }
    )
    problems: list[str] = [f"sent without the component's token: {c}" for c in anonymous]
    problems += compare(calls_by(srv, OPERATOR_SA), grants_for(objs, "lp-loraplane-operator", NS), "operator")
    problems += compare(calls_by(srv, WORKER_SA), grants_for(objs, "lp-loraplane-worker", NS), "worker")
    used = "\n".join(
        f"{who} used: {c}"
        for who, user in (("operator", OPERATOR_SA), ("worker", WORKER_SA))
        for c in sorted(calls_by(srv, user), key=str)
    )
    assert not problems, "\n".join(problems) + "\n\n" + used + "\n\n" + logs()


def _probes_answer(container: dict[str, Any], local_ports: dict[str, int]) -> None:
    """The chart's probes hit paths the running process serves (200), on the ports the flags gave it
    (``local_ports``: the container's port name -> where the test's process listens)."""
    import urllib.request

    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = container.get(kind)
        if probe is None:
            continue
        named = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert probe["httpGet"]["port"] in named, f"{kind} names a port the container does not declare"
        url = f"http://127.0.0.1:{local_ports[probe['httpGet']['port']]}{probe['httpGet']['path']}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            assert resp.status == 200, f"{kind} {url}: {resp.status}"


def _list(adapters: Any) -> list[dict[str, Any]]:
    return adapters.api.list_namespaced_custom_object("loraplane.io", "v1alpha1", TEAM, "loraadapters")[
        "items"
    ]


class _AdminKube:
    """The slice of support.kube.Kube that fleet.Adapters needs, for this test's own server."""

    def __init__(self, kubeconfig: str) -> None:
        self.kubeconfig = kubeconfig

    def api_client(self) -> Any:
        from kubernetes import config

        return config.new_client_from_config(config_file=self.kubeconfig)


def test_grants_and_compare_catch_missing_and_surplus() -> None:
    """The comparison itself: a call outside the rules and a rule never used are both reported."""
    objs = chartkit.manifests(MODES["cluster-wide"])
    grants = grants_for(objs, "lp-loraplane-worker", NS)
    used = {Call(g.verb, g.group, g.resource, g.scope or "anywhere") for g in grants}
    assert compare(used, grants, "w") == []
    missing = compare(used | {Call("delete", "", "pods", NS)}, grants, "w")
    assert missing == [
        f"w: {Call('delete', '', 'pods', NS)} is not allowed by the chart's RBAC (missing rule)"
    ]
    surplus = compare(set(list(used)[1:]), grants, "w")
    assert len(surplus) == 1 and "never used" in surplus[0]
    # A Role grants only in its namespace.
    (pods,) = [g for g in grants if g.resource == "pods"]
    assert pods.scope == NS and not pods.allows(Call("get", "", "pods", "elsewhere"))
