"""Generates the CRD YAML from the pydantic models: ``loraplane crds``.

Kubernetes wants a *structural* OpenAPI v3 schema: no $ref, no anyOf/oneOf around types, every
property typed. pydantic's JSON schema is turned into that shape here (refs inlined, Optional[X]
unwrapped to X, titles dropped), and the CRD envelope (names, printer columns, status subresource)
is added. The same YAML is written to crds/ and the Helm chart's crds/.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from loraplane.crds import models

CRDS_DIR = Path(__file__).resolve().parent
CHART_CRDS_DIR = CRDS_DIR.parent / "charts" / "loraplane" / "crds"
CATEGORIES = ["loraplane"]

_DROP = {"title", "default", "$defs"}  # defaults of optional fields are "absent", not a value to store


def _structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        target = defs[schema["$ref"].split("/")[-1]]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return _structural(merged, defs)
    if "anyOf" in schema:
        options = [s for s in schema["anyOf"] if s.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot make a structural schema of anyOf {schema['anyOf']}")
        rest = {k: v for k, v in schema.items() if k != "anyOf"}
        return _structural({**options[0], **rest}, defs)
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DROP:
            continue
        if key == "properties":
            out[key] = {name: _structural(sub, defs) for name, sub in value.items()}
        elif key == "items":
            out[key] = _structural(value, defs)
        elif key == "const":
            out["enum"] = [value]
        elif key == "additionalProperties" and isinstance(value, dict):
            out[key] = _structural(value, defs) if value else {"x-kubernetes-preserve-unknown-fields": True}
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" not in out and "additionalProperties" not in out:
        out["x-kubernetes-preserve-unknown-fields"] = True
    if out.get("type") == "integer":
        out.setdefault("format", "int64")
    return out


def openapi_schema(model: type[BaseModel]) -> dict[str, Any]:
    raw = model.model_json_schema(mode="validation")
    return _structural(raw, raw.get("$defs", {}))


def _crd(
    *,
    kind: str,
    plural: str,
    singular: str,
    short_names: list[str],
    spec_model: type[BaseModel],
    status_model: type[BaseModel],
    columns: list[dict[str, Any]],
    description: str,
) -> dict[str, Any]:
    schema = {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": openapi_schema(spec_model),
            "status": openapi_schema(status_model),
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{plural}.{models.GROUP}",
            "labels": {"app.kubernetes.io/part-of": "loraplane"},
        },
        "spec": {
            "group": models.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": short_names,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": models.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def adapter_crd() -> dict[str, Any]:
    spec = openapi_schema(models.LoRAAdapterSpec)
    # A cross-field rule with a readable message: the base model decides which workers hold the
    # adapter and which IDs they cache, so moving an adapter to another base model is a new object.
    spec["x-kubernetes-validations"] = [
        {
            "rule": "self.baseModel == oldSelf.baseModel",
            "message": "baseModel is immutable: create a new LoRAAdapter for another base model",
        }
    ]
    crd = _crd(
        kind=models.ADAPTER_KIND,
        plural=models.ADAPTER_PLURAL,
        singular="loraadapter",
        short_names=["lora"],
        spec_model=models.LoRAAdapterSpec,
        status_model=models.LoRAAdapterStatus,
        description="A LoRA adapter: where its weights live, the base model it applies to, and the name "
        "it is served under. The operator assigns status.id, unique in the cluster and never reused.",
        columns=[
            {"name": "Served Name", "type": "string", "jsonPath": ".status.servedName"},
            {"name": "Base Model", "type": "string", "jsonPath": ".spec.baseModel"},
            {"name": "ID", "type": "integer", "jsonPath": ".status.id"},
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Ready", "type": "string", "jsonPath": ".status.ready"},
            {"name": "Workers", "type": "integer", "jsonPath": ".status.workers.total"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            {"name": "Path", "type": "string", "jsonPath": ".spec.path", "priority": 1},
            {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
            {
                "name": "Throttled",
                "type": "string",
                "jsonPath": '.status.conditions[?(@.type=="Throttled")].status',
                "priority": 1,
            },
            {
                "name": "Max Concurrent",
                "type": "integer",
                "jsonPath": ".spec.limits.maxConcurrentRequests",
                "priority": 1,
            },
            {
                "name": "Tokens/Min",
                "type": "integer",
                "jsonPath": ".spec.limits.tokensPerMinute",
                "priority": 1,
            },
        ],
    )
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"] = spec
    return crd


def worker_crd() -> dict[str, Any]:
    return _crd(
        kind=models.WORKER_KIND,
        plural=models.WORKER_PLURAL,
        singular="loraworker",
        short_names=["lw"],
        spec_model=models.LoRAWorkerSpec,
        status_model=models.LoRAWorkerStatus,
        description="One worker pod's report: its capacity and, per adapter ID, its state. Written only by "
        "that worker; garbage-collected with its Pod.",
        columns=[
            {"name": "Base Model", "type": "string", "jsonPath": ".spec.baseModel"},
            {"name": "Ready", "type": "integer", "jsonPath": ".status.ready"},
            {"name": "Failed", "type": "integer", "jsonPath": ".status.failed"},
            {"name": "Loading", "type": "integer", "jsonPath": ".status.loading"},
            {"name": "Assigned", "type": "integer", "jsonPath": ".status.assigned"},
            {"name": "On Device", "type": "integer", "jsonPath": ".status.onDevice"},
            {"name": "Slots", "type": "integer", "jsonPath": ".spec.capacity.maxLoras"},
            {"name": "Heartbeat", "type": "date", "jsonPath": ".status.heartbeatTime"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            {"name": "Pod", "type": "string", "jsonPath": ".spec.podName", "priority": 1},
        ],
    )


class _NoAliasDumper(yaml.SafeDumper):
    """Writes repeated sub-schemas in full: Kubernetes tooling does not expect YAML anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def rendered() -> dict[str, str]:
    """File name -> YAML text of every CRD."""
    header = "# Generated by `loraplane crds` from crds/models.py. Do not edit.\n"
    out = {}
    for crd in (adapter_crd(), worker_crd()):
        name = f"{models.GROUP}_{crd['spec']['names']['plural']}.yaml"
        out[name] = header + yaml.dump(crd, Dumper=_NoAliasDumper, sort_keys=False, width=100)
    return out


def write(targets: list[Path]) -> list[Path]:
    """Write every CRD into each folder; returns the paths written."""
    written = []
    for folder in targets:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in rendered().items():
            path = folder / name
            path.write_text(text)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="loraplane crds",
        description="Print the CRDs as one YAML stream (kubectl apply -f -), or write them into folders.",
        epilog="examples:  loraplane crds | kubectl apply -f -    loraplane crds --output-dir ./crds",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--output-dir",
        type=Path,
        action="append",
        metavar="DIR",
        help="write one file per CRD into DIR (repeatable)",
    )
    where.add_argument(
        "--checkout",
        action="store_true",
        help="regenerate crds/ and charts/loraplane/crds/ of the source checkout this package runs from",
    )
    args = parser.parse_args(argv)
    if args.checkout:
        if not CHART_CRDS_DIR.parent.is_dir():
            parser.error(
                f"{CRDS_DIR} is not in a source checkout (no {CHART_CRDS_DIR.parent}); use --output-dir"
            )
        targets = [CRDS_DIR, CHART_CRDS_DIR]
    elif args.output_dir:
        targets = args.output_dir
    else:
        print("---\n".join(rendered().values()), end="")
        return 0
    for path in write(targets):
        print(f"wrote {path}")
    return 0
