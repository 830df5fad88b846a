"""The CRD YAML is generated from the pydantic models; a stale checked-in copy fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from loraplane.crds import render

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("folder", ["crds", "charts/loraplane/crds"])
def test_checked_in_crds_match_the_models(folder: str) -> None:
    for name, text in render.rendered().items():
        path = REPO / folder / name
        assert path.exists(), f"{path} is missing: run `make crds`"
        assert path.read_text() == text, f"{path} is stale: run `make crds`"


def _walk(schema: dict, where: str = "") -> list[tuple[str, dict]]:
    out = [(where, schema)]
    for name, sub in schema.get("properties", {}).items():
        out += _walk(sub, f"{where}.{name}")
    if "items" in schema:
        out += _walk(schema["items"], f"{where}[]")
    return out


@pytest.mark.parametrize("name", sorted(render.rendered()))
def test_schema_is_structural_and_bounded(name: str) -> None:
    crd = yaml.safe_load(render.rendered()[name])
    root = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for where, node in _walk(root):
        assert "$ref" not in node and "anyOf" not in node and "oneOf" not in node, where
        assert "type" in node, f"{where} has no type (Kubernetes needs a structural schema)"
        if node["type"] == "string" and where.split(".")[1] in ("spec", "status"):
            # Every string is bounded, which also bounds the cost of CEL rules over it.
            assert "maxLength" in node or "enum" in node, f"{where} has no maxLength"


def test_adapter_crd_names_and_columns() -> None:
    crd = render.adapter_crd()
    names = crd["spec"]["names"]
    assert names["shortNames"] == ["lora"] and names["categories"] == ["loraplane"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Served Name", "Base Model", "ID", "Phase", "Ready", "Workers", "Age"]
