"""GitOps pieces: the Argo CD health check (run with a real Lua runtime against sample statuses) and the
examples kustomization (rendered by kubectl's built-in kustomize)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
HEALTH_LUA = REPO / "deploy" / "argocd" / "health-loraadapter.lua"
EXAMPLES = REPO / "examples"


def _adapter(generation: int = 2, status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "loraplane.io/v1alpha1",
        "kind": "LoRAAdapter",
        "metadata": {"name": "sql", "namespace": "team-a", "generation": generation},
        "spec": {"baseModel": "meta-llama/Llama-2-7b-hf", "path": "org/sql"},
    }
    if status is not None:
        obj["status"] = status
    return obj


def _cond(type_: str, status: str, message: str = "") -> dict[str, Any]:
    return {
        "type": type_,
        "status": status,
        "reason": "R",
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }


# (case, object, expected health status, fragment of the message)
CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("no status yet", _adapter(status=None), "Progressing", "assign an ID"),
    ("empty status", _adapter(status={}), "Progressing", "observe generation 2"),
    (
        "stale generation",
        _adapter(status={"phase": "Ready", "id": 7, "observedGeneration": 1}),
        "Progressing",
        "observe generation 2",
    ),
    (
        "pending",
        _adapter(status={"phase": "Pending", "observedGeneration": 2, "message": "waiting for an ID"}),
        "Progressing",
        "waiting for an ID",
    ),
    (
        "registered",
        _adapter(
            status={
                "phase": "Registered",
                "id": 7,
                "observedGeneration": 2,
                "message": "loading on 2 workers",
            }
        ),
        "Progressing",
        "loading on 2 workers",
    ),
    (
        "ready",
        _adapter(
            status={
                "phase": "Ready",
                "id": 7,
                "observedGeneration": 2,
                "workers": {"ready": 3, "failed": 0, "total": 3},
            }
        ),
        "Healthy",
        "Adapter ID 7 is ready (ready on 3/3 workers)",
    ),
    (
        "ready without generation",
        {**_adapter(status={"phase": "Ready", "id": 9}), "metadata": {"name": "x"}},
        "Healthy",
        "Adapter ID 9 is ready",
    ),
    (
        "degraded",
        _adapter(
            status={
                "phase": "Degraded",
                "id": 7,
                "observedGeneration": 2,
                "message": "worker w1: RankTooLarge: rank 128 > 64",
            }
        ),
        "Degraded",
        "RankTooLarge: rank 128 > 64",
    ),
    (
        "failed",
        _adapter(
            status={
                "phase": "Failed",
                "observedGeneration": 2,
                "message": "spec.path: relative paths are not accepted",
            }
        ),
        "Degraded",
        "relative paths are not accepted",
    ),
    (
        "failed without message",
        _adapter(status={"phase": "Failed", "observedGeneration": 2}),
        "Degraded",
        "Adapter is Failed",
    ),
    (
        "served name taken",
        _adapter(
            status={
                "phase": "Pending",
                "id": 7,
                "observedGeneration": 2,
                "conditions": [
                    _cond("IDAssigned", "True"),
                    _cond("NameAvailable", "False", "served name 'sql' is held by team-b/sql"),
                ],
            }
        ),
        "Degraded",
        "held by team-b/sql",
    ),
    ("unknown phase", _adapter(status={"phase": "Exploded", "observedGeneration": 2}), "Unknown", "Exploded"),
]


@pytest.fixture(scope="module")
def health() -> Any:
    """The health check as Argo CD runs it: a Lua chunk with the object as the global `obj`."""
    import lupa

    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    chunk = lua.compile(HEALTH_LUA.read_text())

    def run(obj: dict[str, Any]) -> dict[str, Any]:
        lua.globals().obj = _to_lua(lua, obj)
        result = chunk()
        return {"status": result["status"], "message": result["message"]}

    return run


def _to_lua(lua: Any, value: Any) -> Any:
    """Python JSON-like data to Lua tables, lists 1-based (as Argo CD's JSON-to-Lua conversion does)."""
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    return value


@pytest.mark.parametrize(("case", "obj", "status", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_argocd_health_check(health: Any, case: str, obj: dict[str, Any], status: str, fragment: str) -> None:
    result = health(obj)
    assert result["status"] == status, (case, result)
    assert fragment in result["message"], (case, result)


def test_health_check_in_docs_is_the_file() -> None:
    """docs/deploy.md carries the argocd-cm snippet; its Lua must be the tested file, not a drifting copy."""
    docs = (REPO / "docs" / "deploy.md").read_text()
    assert "resource.customizations.health.loraplane.io_LoRAAdapter: |" in docs
    snippet = docs.split("resource.customizations.health.loraplane.io_LoRAAdapter: |", 1)[1]
    for line in HEALTH_LUA.read_text().splitlines():
        if line.strip():
            assert "    " + line in snippet, (
                f"docs/deploy.md snippet differs from {HEALTH_LUA.name} at: {line}"
            )


def test_kustomization_lists_every_example() -> None:
    kustomization = yaml.safe_load((EXAMPLES / "kustomization.yaml").read_text())
    adapters = sorted(
        p.name
        for p in EXAMPLES.glob("*.yaml")
        if p.name != "kustomization.yaml" and yaml.safe_load(p.read_text()).get("kind") == "LoRAAdapter"
    )
    assert sorted(kustomization["resources"]) == adapters
    paths = [yaml.safe_load((EXAMPLES / a).read_text())["spec"]["path"] for a in adapters]
    assert any(p.startswith("s3://") for p in paths), "an S3 example"
    assert any(p.startswith(("file://", "/")) for p in paths), "a local example"
    assert any(p.startswith("hf://") or ("://" not in p and not p.startswith("/")) for p in paths), (
        "a Hub example"
    )


@pytest.mark.kubectl
def test_kustomization_builds() -> None:
    kubectl = shutil.which("kubectl")
    assert kubectl
    proc = subprocess.run([kubectl, "kustomize", str(EXAMPLES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    assert len(docs) == len(yaml.safe_load((EXAMPLES / "kustomization.yaml").read_text())["resources"])
    assert {d["kind"] for d in docs} == {"LoRAAdapter"}
