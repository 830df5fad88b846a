"""The chart's side of the worker's HTTP hardening: API keys from a Secret, the drain, the NetworkPolicy.

The rendered worker arguments are parsed by the worker's own settings loader against a directory laid
out as the kubelet mounts the Secret, so the chart and the worker agree on flags and paths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from support import adapters, chartkit

from loraplane.worker import settings
from loraplane.worker.api.auth import ApiKeys

MOUNT = "/etc/loraplane/api-keys"


def _worker(objs: list[dict[str, Any]], pool: str = "default") -> tuple[dict[str, Any], dict[str, Any]]:
    (deploy,) = [
        o
        for o in objs
        if o["kind"] in ("Deployment", "StatefulSet") and o["metadata"]["name"].endswith(f"worker-{pool}")
    ]
    spec = deploy["spec"]["template"]["spec"]
    (container,) = [c for c in spec["containers"] if c["name"] == "worker"]
    return spec, container


def test_defaults_drain_within_the_grace_period_behind_a_network_policy() -> None:
    objs = chartkit.manifests({})
    spec, container = _worker(objs)
    assert spec["terminationGracePeriodSeconds"] == 60
    assert container["lifecycle"]["preStop"] == {"exec": {"command": ["sleep", "5"]}}
    assert "--drain-seconds=45" in container["args"]  # 60 s grace - 5 s preStop - a margin
    assert not [a for a in container["args"] if a.startswith("--api-key")]
    probes = {k: container[k]["httpGet"]["path"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes == {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
    # On by default: the worker's port takes traffic only from pods of the release namespace.
    policies = {p["metadata"]["name"]: p["spec"] for p in chartkit.by_kind(objs, "NetworkPolicy")}
    worker = policies["lp-loraplane-worker-default"]
    assert worker["ingress"] == [
        {"ports": [{"port": "http", "protocol": "TCP"}], "from": [{"podSelector": {}}]}
    ]
    assert "lp-loraplane-operator" in policies


def test_api_keys_secret_is_mounted_and_read_by_the_worker(tmp_path: Path) -> None:
    values = {"worker": {"apiKeys": {"secretName": "tenant-keys", "key": "api-keys.txt"}}}
    objs = chartkit.manifests(values)
    spec, container = _worker(objs)
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == "api-keys"]
    assert mount == {
        "name": "api-keys",
        "mountPath": MOUNT,
        "readOnly": True,
    }  # no subPath: rotation reaches it
    (volume,) = [v for v in spec["volumes"] if v["name"] == "api-keys"]
    assert volume["secret"] == {
        "secretName": "tenant-keys",
        "items": [{"key": "api-keys.txt", "path": "keys"}],
    }
    (test_pod,) = [o for o in chartkit.by_kind(objs, "Pod") if o["metadata"]["name"].endswith("default-test")]
    env = {e["name"]: e for e in test_pod["spec"]["containers"][0]["env"]}
    assert env["API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "tenant-keys", "key": "api-keys.txt"}

    # The worker takes the rendered flags, with the Secret laid out where the kubelet puts it.
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    (mounted / "keys").write_text("key-before-rotation\nkey-after-rotation\n")
    base = adapters.write_base_config(tmp_path / "base")
    argv = [
        a.replace(MOUNT, str(mounted))
        for a in container["args"]
        if a.startswith(("--api-key-file", "--drain-seconds", "--port", "--max-"))
    ]
    s = settings.load([*argv, "--base-model", str(base)], {})
    assert s.serving.drain_seconds == 45 and s.auth.api_key_file == str(mounted / "keys")
    keys = ApiKeys(s.auth.api_keys, s.auth.api_key_file)
    assert keys.allows("Bearer key-before-rotation") and keys.allows("Bearer key-after-rotation")
    assert not keys.allows("Bearer key-never-issued")
