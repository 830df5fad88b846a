"""Shared fixtures: the Kubernetes API server every integration test runs against.

Options:
  --kubeconfig PATH   run against a real cluster instead of the local server (loraplane.localkube).
                      Registered by the plugin loraplane.testing (entry point pytest11), so that the
                      space-separated form works with a kubeconfig outside the checkout.

Fixtures:
  kube (session)      a support.kube.Kube:
                        .kubeconfig   path to a kubeconfig file for this server
                        .url          the API server URL
                        .is_local     True for the local server
                        .server       the LocalKube object (audit_log, set_history_window, cluster) or None
                        .api_client() a fresh kubernetes.client.ApiClient
                        .kubectl(*args, check=True, input=None) -> CompletedProcess (skips without kubectl)
                        .apply_crds(paths=None) applies every crds/*.yaml and waits for Established
                        .kubeconfig_for_user(user) a kubeconfig with a token the local server maps to
                                      `user`; every request lands in kube.server.audit_log as an
                                      AuditEntry(user, verb, api_group, resource, subresource, namespace,
                                      name, code). RBAC is recorded, not enforced.
  namespace           a fresh namespace per test (deleted afterwards); its name.
  local_only          skips the test on a real cluster (for local-server internals such as audit_log).
  own_kube            a local API server of the test's own that it may stop and restart
                      (support.apiserver.RestartableKube as .server), CRDs applied; local only.

Markers:
  @pytest.mark.skip_on_local("behaviour")  skip on the local server only; name the behaviour it cannot have.
  @pytest.mark.kubectl                     needs the kubectl binary: skipped with a clear reason without it.
Plain helpers live in tests/support/kube.py (`from support.kube import Kube`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from support.kube import KUBECTL, Kube, local_kube, real_kube


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "skip_on_local(reason): behaviour the local API server cannot have")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    local = not config.getoption("--kubeconfig")
    for item in items:
        mark = item.get_closest_marker("skip_on_local")
        if mark and local:
            reason = mark.args[0] if mark.args else mark.kwargs.get("reason", "unspecified")
            item.add_marker(
                pytest.mark.skip(reason=f"the local API server cannot have this behaviour: {reason}")
            )
        if item.get_closest_marker("kubectl") and KUBECTL is None:
            item.add_marker(
                pytest.mark.skip(reason="kubectl is not installed (a prerequisite named in the README)")
            )


@pytest.fixture(scope="session")
def kube(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kube]:
    path = request.config.getoption("--kubeconfig")
    if path:
        real = real_kube(path)
        with real.removing_crds():  # the suite's CRDs it installed; the cluster is left as it was found
            yield real
        return
    k = local_kube(tmp_path_factory.mktemp("localkube"))
    try:
        yield k
    finally:
        k.server.stop()


@pytest.fixture
def namespace(kube: Kube) -> Iterator[str]:
    name = kube.create_namespace()
    try:
        yield name
    finally:
        kube.delete_namespace(name)


@pytest.fixture
def own_kube(tmp_path: Path) -> Iterator[Kube]:
    from support.apiserver import restartable_kube

    kube = restartable_kube(tmp_path)
    try:
        yield kube
    finally:
        kube.server.stop()


@pytest.fixture
def local_only(kube: Kube) -> None:
    if not kube.is_local:
        pytest.skip("inspects the local server's internals")
