"""The API server the tests run against: the local server by default, a real cluster with --kubeconfig.

Kept out of conftest.py so fixtures stay short; every test reaches the cluster through `Kube`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from support.procs import scaled

REPO = Path(__file__).resolve().parents[2]
KUBECTL = shutil.which("kubectl")


@dataclass
class Kube:
    """One API server: `kubeconfig` (path), `url`, `is_local`, `server` (LocalKube or None)."""

    kubeconfig: str
    url: str
    is_local: bool
    server: Any = None
    _tmp: list[str] = field(default_factory=list)

    def api_client(self) -> Any:
        """A fresh kubernetes.client.ApiClient configured from the kubeconfig."""
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=self.kubeconfig, client_configuration=cfg)
        return client.ApiClient(configuration=cfg)

    def http(self) -> Any:
        """A requests.Session that authenticates as this kubeconfig does (CA, client certificate or token).

        trust_env=False: no proxy, CA bundle or netrc from the environment leaks in. Paths are joined to
        `.url` by the caller."""
        import requests
        from kubernetes import client, config

        cfg = client.Configuration()
        config.load_kube_config(config_file=self.kubeconfig, client_configuration=cfg)
        s = requests.Session()
        s.trust_env = False
        s.verify = (cfg.ssl_ca_cert or True) if cfg.verify_ssl else False
        if cfg.cert_file and cfg.key_file:
            s.cert = (cfg.cert_file, cfg.key_file)
        token = cfg.api_key.get("authorization") or cfg.api_key.get("BearerToken")
        if token:
            s.headers["Authorization"] = token if token.startswith("Bearer ") else f"Bearer {token}"
        return s

    def kubectl(
        self, *args: str, check: bool = True, input: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl with this kubeconfig; skips the test when kubectl is not installed.

        The bounds are scaled as wait_for's are: `timeout`, and a `--timeout=Ns` argument (a kubectl
        wait's or delete's bound), which also extends the process's own bound past it."""
        if KUBECTL is None:
            pytest.skip("kubectl is not installed (needed by this test; see README prerequisites)")
        timeout = scaled(timeout)
        args = tuple(_scaled_timeout_arg(a) for a in args)
        for a in args:
            if a.startswith("--timeout=") and a.endswith("s"):
                timeout = max(timeout, float(a[len("--timeout=") : -1]) + 30)
        env = {**os.environ, "KUBECONFIG": self.kubeconfig, "KUBECACHEDIR": self._cache_dir()}
        # From the repo root, so relative paths (examples/...) resolve wherever pytest was started.
        proc = subprocess.run(
            [KUBECTL, *args],
            input=input,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            cwd=REPO,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr}{proc.stdout}"
            )
        return proc

    def _cache_dir(self) -> str:
        if not self._tmp:
            self._tmp.append(tempfile.mkdtemp(prefix="kubecache-"))
        return self._tmp[0]

    def apply_crds(self, paths: list[Path] | None = None) -> None:
        """Apply every crds/*.yaml (through the Python client, so kubectl is not needed) and wait for them."""
        import yaml
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        files = paths if paths is not None else sorted((REPO / "crds").glob("*.yaml"))
        with self.api_client() as api:
            ext = client.ApiextensionsV1Api(api)
            for f in files:
                for doc in yaml.safe_load_all(Path(f).read_text()):
                    if not doc or doc.get("kind") != "CustomResourceDefinition":
                        continue
                    name = doc["metadata"]["name"]
                    try:
                        current = ext.read_custom_resource_definition(name)
                    except ApiException as e:
                        if e.status != 404:
                            raise
                        ext.create_custom_resource_definition(doc)
                    else:
                        doc["metadata"]["resourceVersion"] = current.metadata.resource_version
                        ext.replace_custom_resource_definition(name, doc)
                    wait_established(ext, name)

    def crd_names(self) -> set[str]:
        from kubernetes import client

        with self.api_client() as api:
            return {
                c.metadata.name
                for c in client.ApiextensionsV1Api(api).list_custom_resource_definition().items
            }

    @contextlib.contextmanager
    def removing_crds(self, names: set[str] | None = None) -> Iterator[None]:
        """Delete, on leaving, the CRDs that appeared inside: those in ``names``, or (None) those of the
        suite's groups. What was there before is left alone: the cluster ends as it was found."""
        before = self.crd_names()
        try:
            yield
        finally:
            new = self.crd_names() - before
            self.delete_crds(
                new & names if names is not None else {n for n in new if n.split(".", 1)[1] in SUITE_GROUPS}
            )

    def delete_crds(self, names: set[str], wait: float = 60) -> None:
        """Delete CRDs (their objects' finalizers released first) and wait until they are gone."""
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        with self.api_client() as api:
            ext, custom = client.ApiextensionsV1Api(api), client.CustomObjectsApi(api)
            for name in sorted(names):
                try:
                    crd = ext.read_custom_resource_definition(name)
                except ApiException as e:
                    if e.status == 404:
                        continue
                    raise
                group, plural = crd.spec.group, crd.spec.names.plural
                version = next(v.name for v in crd.spec.versions if v.served)
                for obj in custom.list_cluster_custom_object(group, version, plural)["items"]:
                    if obj["metadata"].get("finalizers"):
                        meta = obj["metadata"]
                        with contextlib.suppress(ApiException):
                            if meta.get("namespace"):
                                custom.patch_namespaced_custom_object(group, version, meta["namespace"], plural,
                                                                      meta["name"], {"metadata": {"finalizers": None}})  # fmt: skip
                            else:
                                custom.patch_cluster_custom_object(group, version, plural, meta["name"],
                                                                   {"metadata": {"finalizers": None}})  # fmt: skip
                with contextlib.suppress(ApiException):
                    ext.delete_custom_resource_definition(name)
            deadline = time.monotonic() + scaled(wait)
            while names & self.crd_names():
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"CRDs {sorted(names & self.crd_names())} still there after {scaled(wait)}s"
                    )
                time.sleep(0.2)

    def kubeconfig_for_user(self, user: str) -> str:
        """A kubeconfig whose requests the local server records as `user` (see server.audit_log)."""
        from loraplane.localkube import write_kubeconfig

        if self.server is None:
            pytest.skip("per-user tokens need the local server (a real cluster needs real service accounts)")
        token = uuid.uuid4().hex
        self.server.add_token(token, user)
        path = Path(self._cache_dir()) / f"kubeconfig-{token[:8]}"
        return str(write_kubeconfig(self.url, path, token=token))

    def kubeconfig_for_service_account(self, namespace: str, name: str) -> str:
        """A kubeconfig that authenticates as ServiceAccount namespace/name with a TokenRequest token,
        on a real cluster and on localkube alike (the account must exist)."""
        import yaml
        from kubernetes import client

        with self.api_client() as api:
            answer = client.CoreV1Api(api).create_namespaced_service_account_token(
                name, namespace, {"spec": {"expirationSeconds": 3600}}
            )
        src = Path(self.kubeconfig)
        cfg = yaml.safe_load(src.read_text())
        ctx_name = cfg.get("current-context") or cfg["contexts"][0]["name"]
        ctx = next(c for c in cfg["contexts"] if c["name"] == ctx_name)["context"]
        cluster = dict(next(c for c in cfg["clusters"] if c["name"] == ctx["cluster"])["cluster"])
        if cluster.get("certificate-authority"):  # a relative path is relative to the original file
            cluster["certificate-authority"] = str(src.parent / cluster["certificate-authority"])
        user = f"{namespace}-{name}"
        out = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "cluster", "cluster": cluster}],
            "users": [{"name": user, "user": {"token": answer.status.token}}],
            "contexts": [
                {"name": user, "context": {"cluster": "cluster", "user": user, "namespace": namespace}}
            ],
            "current-context": user,
        }
        path = Path(self._cache_dir()) / f"kubeconfig-{user}-{uuid.uuid4().hex[:6]}"
        path.write_text(yaml.safe_dump(out))
        return str(path)

    def create_namespace(self, prefix: str = "t") -> str:
        from kubernetes import client

        name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        with self.api_client() as api:
            client.CoreV1Api(api).create_namespace({"metadata": {"name": name}})
        return name

    def delete_namespace(self, name: str, *, wait: float = 0) -> None:
        """Delete a test's namespace and free what finalizers hold in it (the test's controllers are
        stopped by now, so nothing else would remove them and the namespace would stay Terminating).

        wait: seconds to wait until it is gone (a real namespace controller takes 5-10 s); 0: return at once.
        """
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        with self.api_client() as api:
            core = client.CoreV1Api(api)
            try:
                core.delete_namespace(name)
            except ApiException as e:
                if e.status != 404:
                    raise
                return
            release_finalizers(api, name)
            deadline = time.monotonic() + scaled(wait)
            while wait:
                try:
                    core.read_namespace(name)
                except ApiException as e:
                    if e.status == 404:
                        return
                    raise
                if time.monotonic() > deadline:
                    raise AssertionError(f"namespace {name} still exists after {scaled(wait)}s")
                time.sleep(0.1)


#: API groups of the custom kinds the suite creates objects of (its own, and the test-only ones).
SUITE_GROUPS = {
    "loraplane.io",
    "demo.example.com",
    "ratchet.example.com",
    "kopf.dev",
    "monitoring.coreos.com",
    "inference.networking.k8s.io",  # the chart test's stand-in, when the cluster has none
}


def release_finalizers(api: Any, namespace: str) -> None:
    """Remove the finalizers of the suite's custom objects in a test namespace."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    custom = client.CustomObjectsApi(api)
    for crd in client.ApiextensionsV1Api(api).list_custom_resource_definition().items:
        if crd.spec.scope != "Namespaced" or crd.spec.group not in SUITE_GROUPS:
            continue
        group, plural = crd.spec.group, crd.spec.names.plural
        version = next(v.name for v in crd.spec.versions if v.served)
        try:
            items = custom.list_namespaced_custom_object(group, version, namespace, plural)["items"]
        except ApiException:
            continue
        for obj in items:
            if obj["metadata"].get("finalizers"):
                try:
                    custom.patch_namespaced_custom_object(
                        group,
                        version,
                        namespace,
                        plural,
                        obj["metadata"]["name"],
                        {"metadata": {"finalizers": None}},
                    )
                except ApiException as e:
                    if e.status not in (404, 409, 422):
                        raise


def _scaled_timeout_arg(arg: str) -> str:
    """kubectl's `--timeout=30s` as `--timeout=90s` (TIMEOUT_SCALE 3); any other argument unchanged."""
    seconds = arg[len("--timeout=") : -1] if arg.startswith("--timeout=") and arg.endswith("s") else ""
    return f"--timeout={scaled(float(seconds)):.0f}s" if seconds.isdigit() else arg


def wait_established(ext: Any, name: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + scaled(timeout)
    while time.monotonic() < deadline:
        crd = ext.read_custom_resource_definition(name)
        conds = (crd.status.conditions if crd.status else None) or []
        if any(c.type == "Established" and c.status == "True" for c in conds):
            return
        time.sleep(0.1)
    raise AssertionError(f"CRD {name} not Established within {scaled(timeout)}s")


def local_kube(tmpdir: Path) -> Kube:
    from loraplane.localkube import LocalKube, write_kubeconfig

    server = LocalKube()
    url = server.start()
    path = write_kubeconfig(url, tmpdir / "localkube.kubeconfig")
    return Kube(kubeconfig=str(path), url=url, is_local=True, server=server)


def real_kube(kubeconfig: str) -> Kube:
    from kubernetes import client, config

    cfg = client.Configuration()
    config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    return Kube(kubeconfig=kubeconfig, url=cfg.host, is_local=False)
