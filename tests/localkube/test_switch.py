"""The README's switch, `pytest --kubeconfig PATH`, as a user types it: a kubeconfig outside the checkout,
the option in both forms, pytest started inside and outside the checkout. The "cluster" is a localkube
started here, so the run can be checked from the server's side (its audit log)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from loraplane.localkube import LocalKube, write_kubeconfig

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PYTEST = str(Path(sys.executable).parent / "pytest")
PROBE = "tests/localkube/test_semantics.py::test_lease_conflicts"


@pytest.fixture
def cluster(tmp_path_factory: pytest.TempPathFactory):
    home = tmp_path_factory.mktemp("home")  # stands for ~/.kube: not under the checkout
    with LocalKube() as server:
        yield server, str(write_kubeconfig(server.url, home / "config"))


@pytest.mark.parametrize(
    ("where", "form"),
    [("checkout", "space"), ("outside", "space"), ("outside", "equals")],
)
def test_kubeconfig_switch_runs_the_suite_against_that_server(cluster, tmp_path, where, form) -> None:
    server, kubeconfig = cluster
    option = ["--kubeconfig", kubeconfig] if form == "space" else [f"--kubeconfig={kubeconfig}"]
    if where == "checkout":
        # The README's command: no test path, so the kubeconfig is the only free argument; testpaths
        # narrows the run to one test the way the ini file would.
        cmd, cwd = [PYTEST, *option, "-o", f"testpaths={PROBE.split('::')[0]}", "-k", "lease"], REPO
    else:
        cmd, cwd = [PYTEST, *option, str(REPO / PROBE)], tmp_path
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "KUBECONFIG"))}
    proc = subprocess.run(
        [*cmd, "-q", "-p", "no:cacheprovider"], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "1 passed" in out, out
    leases = [e for e in server.audit_log if e.resource == "leases" and e.verb == "create"]
    assert len(leases) == 1, "the run did not reach the server named by --kubeconfig"


def test_a_run_against_a_cluster_leaves_no_crds_behind(cluster, tmp_path) -> None:
    """Issue 18: a run with --kubeconfig left loraadapters, loraworkers, widgets and kopf's two peering
    CRDs on the cluster. Each is removed by whoever installed it (a module's fixture, the session)."""
    server, kubeconfig = cluster
    probes = [
        PROBE,  # widgets, from its module's fixture
        "tests/localkube/test_kopf.py::test_kopf_peering",  # widgets and kopf's peering CRDs
        "tests/operator/test_store_check.py",  # loraadapters and loraworkers, from the test itself
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "KUBECONFIG"))}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--kubeconfig", kubeconfig, *[str(REPO / p) for p in probes], "-q", "-p", "no:cacheprovider"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "3 passed" in out, out
    created = [
        e for e in server.audit_log if e.resource == "customresourcedefinitions" and e.verb == "create"
    ]
    assert len(created) >= 5, created  # widgets, 2 peering, 2 of ours: installed, then
    with urllib.request.urlopen(server.url + "/apis/apiextensions.k8s.io/v1/customresourcedefinitions") as r:
        left = [c["metadata"]["name"] for c in json.load(r)["items"]]
    assert left == []
