"""RBAC proven, not asserted: the operator and a worker run as real processes with their service
accounts' tokens (TokenRequest), through an end-to-end flow, against an API server that enforces
RBAC: a call no rule allows fails the flow (403). The other direction, no surplus:

- on localkube (RBAC enforced, every call recorded with the caller's identity) each identity's calls are
  compared with the rules the chart renders for its service account: a rule nothing used fails;
- on any server, a real cluster too (--kubeconfig), each account's effective rules as the server
  reports them (SelfSubjectRulesReview, less what a bare service account has) must be exactly the
  chart's rules in every namespace, and SubjectAccessReview must deny the calls the components must
  never make.

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
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from support import chartkit, fleet

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

NS = chartkit.NAMESPACE  # the release namespace on localkube: operator, workers, ledger, LoRAWorker objects
TEAM = "team-a"  # where users put their adapters (on localkube)
SERVED = "tiny-llama"
OPERATOR = f"{chartkit.RELEASE}-loraplane-operator"  # service account names
WORKER = f"{chartkit.RELEASE}-loraplane-worker"
# On a real cluster only these kinds are created (the chart's Deployments would start real pods).
RBAC_KINDS = ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")


def modes(team: str) -> dict[str, dict[str, Any]]:
    namespaced = {"watch": {"clusterWide": False, "namespaces": [team]}}
    return {
        "cluster-wide": {"watch": {"clusterWide": True}},
        "namespaced": namespaced,
        # The body-based-routing ConfigMaps too (in the release namespace: BBR's).
        "namespaced-bbr": {**namespaced, "bodyBasedRouting": {"enabled": True}},
    }


MODES = modes(TEAM)


def sa_user(namespace: str, name: str) -> str:
    return f"system:serviceaccount:{namespace}:{name}"


@dataclass(frozen=True)
class Call:
    """One API call as an authorizer sees it. namespace "" is a cluster-scoped or all-namespaces call."""

    verb: str
    group: str
    resource: str  # "resource" or "resource/subresource"
    namespace: str
    name: str = ""  # the object's name where the request names one (get, update, ...; list by name)


@dataclass(frozen=True)
class Grant:
    """One verb on one resource from one rule, in one scope (namespace, or None for cluster-wide)."""

    verb: str
    group: str
    resource: str
    scope: str | None
    source: str  # Kind/name of the role, for messages
    names: tuple[str, ...] = ()  # resourceNames; empty: any object

    def allows(self, call: Call) -> bool:
        return (
            self.verb == call.verb
            and self.group == call.group
            and self.resource == call.resource
            and (self.scope is None or self.scope == call.namespace)
            and (not self.names or call.name in self.names)
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
            names = tuple(sorted(rule.get("resourceNames") or ()))
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        out.append(Grant(verb, group, resource, scope, f"{ref['kind']}/{ref['name']}", names))
    return out


def calls_by(server: Any, user: str) -> set[Call]:
    return {
        Call(
            e.verb,
            e.api_group,
            f"{e.resource}/{e.subresource}" if e.subresource else e.resource,
            e.namespace,
            e.name,
        )
        for e in list(server.audit_log)
        if e.user == user
    }


Permission = tuple[str, str, str, tuple[str, ...]]  # verb, group, resource, resourceNames


def expected_in(grants: list[Grant], namespace: str) -> set[Permission]:
    """What the chart grants in one namespace (its ClusterRoles apply in every namespace)."""
    return {(g.verb, g.group, g.resource, g.names) for g in grants if g.scope in (None, namespace)}


def effective_in(http: Any, url: str, namespace: str) -> set[Permission]:
    """The caller's rules in `namespace` as the server reports them (SelfSubjectRulesReview)."""
    body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectRulesReview"}
    r = http.post(
        url + "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews",
        json={**body, "spec": {"namespace": namespace}},
    )
    assert r.status_code == 201, r.text
    status = r.json()["status"]
    assert not status.get("incomplete"), status
    return {
        (verb, group, resource, tuple(sorted(rule.get("resourceNames") or ())))
        for rule in status.get("resourceRules") or []
        for verb in rule.get("verbs") or []
        for group in rule.get("apiGroups") or []
        for resource in rule.get("resources") or []
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


@dataclass
class Cluster:
    """Where the flow runs: `kube` (the admin's view), `server` (the LocalKube, for its audit log; None on
    a real cluster), the release namespace, the team namespace and a namespace the chart has no part in."""

    kube: Any
    server: Any
    ns: str
    team: str
    elsewhere: str


@pytest.fixture
def cluster(kube: Any, namespace: str, tmp_path: Path) -> Iterator[Cluster]:
    """localkube: a server of its own that enforces RBAC (the session's allows everything). A real
    cluster: fresh namespaces, removed afterwards with the chart's cluster-scoped objects."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException
    from support.kube import Kube

    from loraplane.localkube import LocalKube, write_kubeconfig

    if kube.is_local:
        srv = LocalKube(authorization="RBAC")
        url = srv.start()
        admin = Kube(str(write_kubeconfig(url, tmp_path / "admin.kubeconfig")), url, True, srv)
        try:
            yield Cluster(admin, srv, NS, TEAM, namespace)
        finally:
            srv.stop()
        return
    suffix = uuid.uuid4().hex[:6]
    here = Cluster(kube, None, f"lp-rbac-{suffix}", f"team-{suffix}", namespace)
    try:
        yield here
    finally:
        with kube.api_client() as api:
            rbac = client.RbacAuthorizationV1Api(api)
            for mode in MODES:
                for obj in chartkit.manifests(modes(here.team)[mode], namespace=here.ns):
                    try:
                        if obj["kind"] == "ClusterRoleBinding":
                            rbac.delete_cluster_role_binding(obj["metadata"]["name"])
                        elif obj["kind"] == "ClusterRole":
                            rbac.delete_cluster_role(obj["metadata"]["name"])
                    except ApiException as e:
                        if e.status != 404:
                            raise
        for ns in (here.ns, here.team):
            kube.delete_namespace(ns, wait=60)


def _admin_setup(c: Cluster, objs: list[dict[str, Any]], pod_name: str) -> None:
    """As the cluster admin: CRDs, namespaces, service accounts and RBAC (all of the chart's objects on
    localkube, where nothing runs), and the worker's Pod, held unscheduled so no kubelet runs it."""
    from kubernetes import client, dynamic

    c.kube.apply_crds(
        [chartkit.CHART / "crds" / p.name for p in sorted((chartkit.CHART / "crds").glob("*.yaml"))]
    )
    with c.kube.api_client() as api:
        core = client.CoreV1Api(api)
        for ns in (c.ns, c.team):
            core.create_namespace({"metadata": {"name": ns}})
        core.create_namespaced_service_account(c.ns, {"metadata": {"name": "bare"}})  # the baseline
        dyn = dynamic.DynamicClient(api)
        for obj in objs:
            if c.server is None and obj["kind"] not in RBAC_KINDS:
                continue
            resource = dyn.resources.get(api_version=obj["apiVersion"], kind=obj["kind"])
            resource.create(body=obj, namespace=obj["metadata"].get("namespace"))
        (worker,) = [o for o in objs if o["kind"] == "Deployment" and "-worker-" in o["metadata"]["name"]]
        template = worker["spec"]["template"]
        dyn.resources.get(api_version="v1", kind="Pod").create(
            namespace=c.ns,
            body={
                "metadata": {"name": pod_name, "labels": template["metadata"]["labels"]},
                "spec": {**template["spec"], "schedulingGates": [{"name": "loraplane.io/rbac-test"}]},
            },
        )


@pytest.mark.parametrize("mode", sorted(MODES))
def test_chart_rbac_is_exactly_what_the_components_use(
    mode: str, cluster: Cluster, tiny: dict[str, Path], tmp_path: Path
) -> None:
    c = cluster
    values = {
        **modes(c.team)[mode],
        # Small ID blocks, so that the flow reserves a second block (the ledger's CAS update) too.
        # Frequent liveness ticks, so that the pod check of each worker report happens within the flow.
        "operator": {"extraArgs": ["--block-size=2", "--liveness-interval=0.5"]},
        "workerPools": [
            {"name": "tiny", "baseModel": {"source": "/models/tiny", "servedName": SERVED}, "device": "cpu"}
        ],
    }
    objs = chartkit.manifests(values, namespace=c.ns)
    pod_name = f"{WORKER}-tiny-0"
    _admin_setup(c, objs, pod_name)
    if mode == "cluster-wide" and c.server is None:
        _wait_alone(c)
    kubeconfigs = {sa: c.kube.kubeconfig_for_service_account(c.ns, sa) for sa in (OPERATOR, WORKER, "bare")}
    flow_start = len(c.server.audit_log) if c.server else 0

    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBECONFIG", "LORAPLANE_"))}
    bin_dir = Path(sys.executable).parent

    op_container = _container(objs, "-operator")
    op_port, health_port = fleet.free_port(), fleet.free_port()
    op_args = _replace(
        op_container["args"],
        {"--metrics-port": str(op_port), "--health-port": str(health_port), "--metrics-address": "127.0.0.1"},
    )
    operator = Proc(
        [str(bin_dir / "loraplane-operator"), *op_args, "--kubeconfig", kubeconfigs[OPERATOR]],
        {**base_env, "POD_NAME": f"{OPERATOR}-0", "POD_NAMESPACE": c.ns},
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
        [str(bin_dir / "loraplane-worker"), *wk_args, "--kubeconfig", kubeconfigs[WORKER]],
        {
            **base_env,
            "POD_NAME": pod_name,
            "POD_NAMESPACE": c.ns,
            "NODE_NAME": "node-1",
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_OFFLINE": "1",
        },
        tmp_path / "worker.log",
    )
    logs = lambda: f"operator log:\n{operator.log()}\nworker log:\n{worker.log()}"  # noqa: E731
    adapters = fleet.Adapters(c.kube, c.team)
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
        fleet.wait_for(
            lambda: "alpha" not in {a["metadata"]["name"] for a in _list(adapters, c.team)}, 30, logs
        )
        # A container restart in the same pod: its LoRAWorker object is still there.
        worker.kill()
        worker.start()
        fleet.wait_for(lambda: worker.log_path.read_text().count("ready to report") >= 2, 60, logs)
        fleet.wait_for(lambda: phase("beta") == "Ready" and phase("broken") == "Failed", 60, logs)
        assert worker.stop() == 0, logs()
        time.sleep(2)  # let the operator see the worker go
        if mode == "namespaced-bbr":  # no adapter and no worker left: the base model's ConfigMap goes
            from kubernetes import client

            core = client.CoreV1Api(adapters._api_client)
            bbr = "inference.networking.k8s.io/bbr-managed=true"
            assert core.list_namespaced_config_map(c.ns, label_selector=bbr).items, logs()
            adapters.delete("beta")
            adapters.delete("broken")
            fleet.wait_for(
                lambda: not core.list_namespaced_config_map(c.ns, label_selector=bbr).items, 30, logs
            )
    finally:
        worker.stop()
        operator.stop()
        adapters.close()

    # Denied calls surface as 403 / Forbidden in the components' logs even where they retry and go on.
    problems: list[str] = [
        f"{who} was refused a call:\n{proc.log()}"
        for who, proc in (("operator", operator), ("worker", worker))
        if "forbidden" in proc.log().lower()
    ]
    grants = {sa: grants_for(objs, sa, c.ns) for sa in (OPERATOR, WORKER)}
    if c.server is not None:
        problems += _compare_audit(c, flow_start, grants)
    problems += _compare_effective(c, kubeconfigs, grants)
    problems += _denied(c, bbr=mode == "namespaced-bbr")
    assert not problems, "\n".join(problems) + "\n\n" + logs()


def _wait_alone(c: Cluster) -> None:
    """A cluster-wide operator counts every adapter and worker report in the cluster: wait until other
    tests' namespaces (Terminating for seconds on a real cluster) have taken theirs away; skip when
    others stay (a live installation)."""
    from kubernetes import client

    def others() -> list[str]:
        with c.kube.api_client() as api:
            custom = client.CustomObjectsApi(api)
            items = [
                o
                for plural in ("loraadapters", "loraworkers")
                for o in custom.list_cluster_custom_object("loraplane.io", "v1alpha1", plural)["items"]
            ]
        return [f"{o['kind']} {o['metadata']['namespace']}/{o['metadata']['name']}" for o in items]

    deadline = time.monotonic() + 60
    while (found := others()) and time.monotonic() < deadline:
        time.sleep(1)
    if found:
        pytest.skip(
            f"cluster-wide mode needs a cluster without other LoRAAdapters or LoRAWorkers: {found[:5]}"
        )


def _compare_audit(c: Cluster, flow_start: int, grants: dict[str, list[Grant]]) -> list[str]:
    """localkube: the calls each identity made against the chart's rules, both ways."""
    # The test's own admin calls touch only adapters in the team namespace (and list the BBR ConfigMaps
    # of the release namespace); any other call without credentials comes from a component that does
    # not send its service-account token.
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
            for e in list(c.server.audit_log)[flow_start:]
            if e.user == "admin"
            and not (e.resource == "loraadapters" and e.namespace == c.team and not e.subresource)
            and not (e.resource == "configmaps" and e.namespace == c.ns and e.verb == "list")
        }
    )
    problems = [f"sent without the component's token: {call}" for call in anonymous]
    for who, sa in (("operator", OPERATOR), ("worker", WORKER)):
        problems += compare(calls_by(c.server, sa_user(c.ns, sa)), grants[sa], who)
    if problems:
        problems.append(
            "\n".join(
                f"{who} used: {call}"
                for who, sa in (("operator", OPERATOR), ("worker", WORKER))
                for call in sorted(calls_by(c.server, sa_user(c.ns, sa)), key=str)
            )
        )
    return problems


def _compare_effective(c: Cluster, kubeconfigs: dict[str, str], grants: dict[str, list[Grant]]) -> list[str]:
    """The server's view of each account (SelfSubjectRulesReview, less a bare account's) is the chart's
    rules exactly, in the release namespace, the team namespace and one the chart has no part in."""
    from support.kube import Kube

    def rules(sa: str, ns: str) -> set[Permission]:
        with Kube(kubeconfigs[sa], c.kube.url, c.kube.is_local).http() as http:
            return effective_in(http, c.kube.url, ns)

    problems = []
    for ns in (c.ns, c.team, c.elsewhere):
        baseline = rules("bare", ns)
        for who, sa in (("operator", OPERATOR), ("worker", WORKER)):
            got, want = rules(sa, ns) - baseline, expected_in(grants[sa], ns)
            problems += [
                f"{who} in {ns}: the server grants {p} beyond the chart's rules" for p in sorted(got - want)
            ]
            problems += [f"{who} in {ns}: the chart's {p} is not in effect" for p in sorted(want - got)]
    return problems


def _denied(c: Cluster, bbr: bool = False) -> list[str]:
    """SubjectAccessReview: what neither component may ever do. ``bbr``: body-based routing writes its
    ConfigMaps in the release namespace, so there (only there) other ConfigMaps are writable too."""
    from kubernetes import client

    must_not = [
        (OPERATOR, "create", "loraplane.io", "loraadapters", "", c.team),
        (OPERATOR, "update", "loraplane.io", "loraadapters", "", c.team),
        (OPERATOR, "delete", "loraplane.io", "loraadapters", "", c.team),
        (OPERATOR, "get", "", "secrets", "", c.ns),
        (OPERATOR, "delete", "", "pods", "", c.ns),
        (WORKER, "update", "loraplane.io", "loraadapters", "status", c.team),
        (WORKER, "patch", "loraplane.io", "loraadapters", "", c.team),
        (WORKER, "create", "loraplane.io", "loraworkers", "", c.team),
        (WORKER, "get", "", "secrets", "", c.ns),
        (WORKER, "update", "", "configmaps", "", c.ns),
        # The operator's ConfigMap rights name the ledger: no other ConfigMap is readable or writable.
        (OPERATOR, "get", "", "configmaps", "", c.ns, "kube-root-ca.crt"),
        (OPERATOR, "update", "", "configmaps", "", c.elsewhere if bbr else c.ns, "someone-elses"),
        (OPERATOR, "delete", "", "configmaps", "", c.team, "someone-elses"),
    ]
    problems = []
    with c.kube.api_client() as api:
        authz = client.AuthorizationV1Api(api)
        for sa, verb, group, resource, sub, ns, *name in must_not:
            attrs = {"verb": verb, "group": group, "resource": resource, "subresource": sub, "namespace": ns}
            attrs |= {"name": name[0]} if name else {}
            review = authz.create_subject_access_review(
                {
                    "spec": {
                        "user": sa_user(c.ns, sa),
                        "groups": [
                            "system:serviceaccounts",
                            f"system:serviceaccounts:{c.ns}",
                            "system:authenticated",
                        ],
                        "resourceAttributes": attrs,
                    }
                }
            )
            if review.status.allowed:
                problems.append(
                    f"{sa} may {verb} {resource}{'/' + sub if sub else ''} in {ns}: {review.status.reason}"
                )
    return problems


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


def _list(adapters: Any, namespace: str) -> list[dict[str, Any]]:
    return adapters.api.list_namespaced_custom_object("loraplane.io", "v1alpha1", namespace, "loraadapters")[
        "items"
    ]


def test_grants_and_compare_catch_missing_and_surplus() -> None:
    """The comparison itself: a call outside the rules and a rule never used are both reported."""
    objs = chartkit.manifests(MODES["cluster-wide"])
    grants = grants_for(objs, WORKER, NS)
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
