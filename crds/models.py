"""The loraplane API: pydantic models of LoRAAdapter and LoRAWorker, the one schema source.

The CRD YAML in this folder is generated from these models (``loraplane crds``), and the operator
and worker validate every object they read with the same models, so a bad object that reached the
server some other way (an older schema, a server without CEL) gets the same message as at admission.
Field names are the Kubernetes camelCase names; admission rules live in ``json_schema_extra``.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from loraplane.crds import paths
from loraplane.crds.errors import PermanentError

GROUP = "loraplane.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
ADAPTER_KIND = "LoRAAdapter"
ADAPTER_PLURAL = "loraadapters"
WORKER_KIND = "LoRAWorker"
WORKER_PLURAL = "loraworkers"

ID_MAX = 2**31 - 1  # IDs fit a signed 32-bit integer (engines and routers store them as int32).

# Reason used when an object fails the models (status.message, Events, logs).
INVALID_SPEC = "InvalidSpec"

BASE_MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
SERVED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
REVISION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]*$"
K8S_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


def version_of(path: str, revision: str | None) -> str:
    """The digest in status.version: what an ID is bound to (the weights' path and revision).

    The operator writes it with the ID; workers compare it with the spec to know whether status.id
    names the current version. 16 hex digits; no revision and an empty one are the same.
    """
    return hashlib.sha256(f"{path}\n{revision or ''}".encode()).hexdigest()[:16]


class _Model(BaseModel):
    # Unknown fields are ignored: the server prunes them; an older operator must read newer objects.
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class LongContext(_Model):
    """Long-context metadata passed to the engine (the seed's long_lora_context)."""

    maxLength: int = Field(
        ge=1,
        le=ID_MAX,
        description="Longest sequence (prompt + completion tokens) this adapter serves. Workers refuse the "
        "adapter when the base model cannot reach it (max_position_embeddings and RoPE scaling).",
    )


class LoRAAdapterSpec(_Model):
    """What the user declares: an adapter's weights, its base model and the name it is served under."""

    baseModel: str = Field(
        min_length=1,
        max_length=256,
        pattern=BASE_MODEL_PATTERN,
        description="The base model this adapter applies to, as the worker pools serve it "
        "(for example meta-llama/Llama-2-7b-hf). Only workers serving this base model load the adapter.",
    )
    path: str = Field(
        min_length=1,
        max_length=paths.PATH_MAX_LENGTH,
        pattern=paths.PATH_PATTERN,
        description=f"Where the weights live: {paths.ACCEPTED_FORMS}. The directory holds "
        "adapter_config.json and adapter_model.safetensors in PEFT's format.",
        json_schema_extra={
            "x-kubernetes-validations": [{"rule": r.rule, "message": r.message} for r in paths.PATH_RULES]
        },
    )
    revision: str | None = Field(
        default=None,
        min_length=1,
        max_length=255,
        pattern=REVISION_PATTERN,
        description="Hugging Face revision (branch, tag or commit); the resolved commit is reported in "
        "status.adapter.resolvedRevision. For local and s3:// paths an opaque version label: change it to "
        "roll out weights rewritten at the same path. Changing it gives the adapter a new ID.",
    )
    name: str | None = Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=SERVED_NAME_PATTERN,
        description="Served name: the OpenAI `model` field that selects this adapter. Default: metadata.name. "
        "Unique per base model across the cluster; the oldest claimant keeps it.",
    )
    longContext: LongContext | None = Field(default=None, description="Optional long-context metadata.")

    @field_validator("path")
    @classmethod
    def _path_form(cls, value: str) -> str:
        problems = paths.path_problems(value)
        if problems:
            raise ValueError("; ".join(problems))
        return value

    @property
    def source_kind(self) -> paths.SourceKind:
        return paths.source_kind(self.path)


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(_Model):
    """The standard Kubernetes condition shape (metav1.Condition)."""

    type: str = Field(max_length=316, pattern=r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
    status: ConditionStatus
    reason: str = Field(max_length=1024, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    message: str = Field(default="", max_length=32768)
    lastTransitionTime: str = Field(max_length=64, json_schema_extra={"format": "date-time"})
    observedGeneration: int | None = Field(default=None, ge=0)


Phase = Literal["Pending", "Registered", "Ready", "Degraded", "Failed"]


class AdapterInfo(_Model):
    """What the workers found in the weights (from the first worker that validated them)."""

    rank: int | None = Field(default=None, ge=1, le=65536)
    alpha: float | None = None
    useRslora: bool | None = None
    targetModules: list[Annotated[str, Field(max_length=128)]] | None = Field(default=None, max_length=64)
    sizeBytes: int | None = Field(default=None, ge=0)
    sha256: str | None = Field(default=None, max_length=64, pattern=r"^[0-9a-f]{64}$")
    resolvedRevision: str | None = Field(default=None, max_length=255)
    chatTemplate: str | None = Field(
        default=None,
        max_length=64,
        description="Which chat template renders this adapter's chat requests: the adapter's own file "
        '(chat_template.jinja or tokenizer_config.json) or "base model".',
    )


class WorkerCounts(_Model):
    """How many live workers of the adapter's base model have it Ready or Failed."""

    ready: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)
    total: int = Field(default=0, ge=0)


AdapterId = Annotated[int, Field(ge=1, le=ID_MAX)]


class LoRAAdapterStatus(_Model):
    """Written by the operator only (workers report through their LoRAWorker objects)."""

    id: AdapterId | None = Field(default=None, description="Cluster-unique adapter ID; never reused.")
    previousId: AdapterId | None = Field(
        default=None, description="ID of the previous version, kept until every worker has switched."
    )
    version: str | None = Field(
        default=None,
        max_length=64,
        description="Digest of the (path, revision) that status.id was assigned to; a spec change that "
        "alters it is a new version of the weights and gets a new ID.",
    )
    servedName: str | None = Field(default=None, max_length=128, description="Effective served name.")
    phase: Phase | None = None
    observedGeneration: int | None = Field(default=None, ge=0)
    conditions: list[Condition] | None = Field(
        default=None,
        max_length=16,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    adapter: AdapterInfo | None = None
    workers: WorkerCounts | None = None
    message: str | None = Field(default=None, max_length=4096, description="Why the adapter is not Ready.")


class LoRAAdapter(_Model):
    apiVersion: str = API_VERSION
    kind: str = ADAPTER_KIND
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: LoRAAdapterSpec
    status: LoRAAdapterStatus | None = None

    @property
    def served_name(self) -> str:
        return self.spec.name or self.metadata.get("name", "")


# ---- LoRAWorker: one per worker pod, written only by that worker -------------------------------

WorkerAdapterState = Literal["Pending", "Prefetching", "Validating", "Ready", "Failed"]


class WorkerCapacity(_Model):
    maxLoras: int = Field(ge=1, le=4096, description="Device slots for adapters.")
    maxLoraRank: int = Field(ge=1, le=65536, description="Largest rank a slot holds.")
    maxCpuLoras: int = Field(ge=1, le=65536, description="Adapters kept in CPU memory.")
    cacheBytes: int = Field(ge=0, description="Disk cache budget in bytes.")


class LoRAWorkerSpec(_Model):
    baseModel: str = Field(
        min_length=1,
        max_length=256,
        pattern=BASE_MODEL_PATTERN,
        description="The base model this worker serves.",
    )
    podName: str | None = Field(default=None, max_length=253, pattern=K8S_NAME_PATTERN)
    nodeName: str | None = Field(default=None, max_length=253)
    endpoint: str | None = Field(default=None, max_length=1024, description="URL of its OpenAI API.")
    capacity: WorkerCapacity


class WorkerAdapterReport(_Model):
    """One adapter version as this worker sees it, keyed by ID."""

    id: AdapterId
    adapter: str = Field(max_length=317, description="namespace/name of the LoRAAdapter.")
    state: WorkerAdapterState
    reason: str | None = Field(default=None, max_length=128)
    message: str | None = Field(default=None, max_length=2048)
    onDevice: bool = False
    info: AdapterInfo | None = None


class LoRAWorkerStatus(_Model):
    heartbeatTime: str | None = Field(default=None, max_length=64, json_schema_extra={"format": "date-time"})
    ready: int = Field(default=0, ge=0, description="Adapters Ready on this worker.")
    failed: int = Field(default=0, ge=0, description="Adapters Failed on this worker.")
    onDevice: int = Field(default=0, ge=0, description="Adapters in device slots now.")
    cacheBytesUsed: int = Field(default=0, ge=0)
    adapters: list[WorkerAdapterReport] | None = Field(
        default=None,
        max_length=8192,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["id"]},
    )


class LoRAWorker(_Model):
    apiVersion: str = API_VERSION
    kind: str = WORKER_KIND
    metadata: dict[str, Any] = Field(default_factory=dict)
    spec: LoRAWorkerSpec
    status: LoRAWorkerStatus | None = None


def describe_errors(error: ValidationError) -> str:
    """One line per problem, with the field path as kubectl would print it (spec.path: ...)."""
    lines = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}")
    return "; ".join(lines)


def parse_adapter(obj: dict[str, Any]) -> LoRAAdapter:
    """Validate a LoRAAdapter read from the API; raises PermanentError(InvalidSpec) naming each field."""
    try:
        return LoRAAdapter.model_validate(obj)
    except ValidationError as exc:
        raise PermanentError(INVALID_SPEC, describe_errors(exc)) from None
