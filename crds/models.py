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

from loraplane.crds import paths, ranges
from loraplane.errors import PermanentError

GROUP = "loraplane.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
ADAPTER_KIND = "LoRAAdapter"
ADAPTER_PLURAL = "loraadapters"
WORKER_KIND = "LoRAWorker"
WORKER_PLURAL = "loraworkers"

ID_MAX = 2**31 - 1  # IDs fit a signed 32-bit integer (engines and routers store them as int32).
REPLICAS_MAX = 256  # workers one adapter is placed on (status.placement.workers' bound)

# Reason used when an object fails the models (status.message, Events, logs).
INVALID_SPEC = "InvalidSpec"

BASE_MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
SERVED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
REVISION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]*$"
K8S_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
# An adapter's files pinned by content: the OpenSSF model-signing manifest's root digest (docs/provenance.md).
DIGEST_PATTERN = r"^sha256:[0-9a-f]{64}$"


def version_of(path: str, revision: str | None, digest: str | None = None) -> str:
    """The digest in status.version: what an ID is bound to (the weights' path, revision and pinned digest).

    The operator writes it with the ID; workers compare it with the spec to know whether status.id
    names the current version. 16 hex digits; no revision and an empty one are the same. Without a
    digest the value is the one loraplane wrote before digests existed, so no adapter changes ID on
    upgrade; adding, changing or removing spec.digest is a new version.
    """
    pinned = f"\n{digest}" if digest else ""
    return hashlib.sha256(f"{path}\n{revision or ''}{pinned}".encode()).hexdigest()[:16]


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


class SignatureSpec(_Model):
    """What this adapter asks of its signature (the pool may require one for every adapter)."""

    required: bool = Field(
        default=True,
        description="Serve the adapter only with a valid OpenSSF model signature (model.sig beside the files), "
        "verified against the worker pool's trust material (chart value signing.trust). A pool that "
        "requires signatures requires them whatever this says.",
    )


class AdapterLimits(_Model):
    """What one adapter may use (docs/worker.md, "Tenants"). Cluster-wide: each worker enforces its share,
    the limit divided by the workers that have the adapter Ready (status.workers.ready), rounded up.
    Edits take effect without a restart; a request over a limit gets 429 with Retry-After."""

    maxConcurrentRequests: int | None = Field(
        default=None, ge=1, le=1_000_000, description="Requests of this adapter running or queued at once."
    )
    tokensPerMinute: int | None = Field(
        default=None,
        ge=1,
        le=10**12,
        description="Prompt + completion tokens per minute (a token bucket: a request reserves its prompt "
        "and max_tokens when admitted, and gets back what it did not generate).",
    )
    maxOutputTokens: int | None = Field(
        default=None,
        ge=1,
        le=ID_MAX,
        description="Most completion tokens one request may ask for: a request without max_tokens gets this "
        "many at most; one asking for more is refused (400 MaxTokensAboveLimit).",
    )
    weight: int | None = Field(
        default=None,
        ge=1,
        le=1000,
        description="Share of a saturated worker relative to other adapters (default 1): fair share counts "
        "prompt + completion tokens, divided by the weight.",
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
        "status.adapter.resolvedRevision. For every other kind of path (local, object stores) an opaque "
        "version label: change it to roll out weights rewritten at the same path. Changing it gives the adapter a new ID.",
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
    digest: str | None = Field(
        default=None,
        max_length=71,
        pattern=DIGEST_PATTERN,
        description="Pin the adapter's files by content: sha256:<hex> over the canonical manifest of "
        "adapter_config.json and adapter_model.safetensors (the root digest of an OpenSSF model-signing "
        "manifest of those files). Workers refuse other bytes (DigestMismatch). `loraplane validate --digest "
        "DIR` prints it, and status.adapter.digest shows what the workers fetched. Changing it gives the "
        "adapter a new ID.",
    )
    signature: SignatureSpec | None = Field(
        default=None, description="Require an OpenSSF model signature (model.sig) for this adapter."
    )
    limits: AdapterLimits | None = Field(
        default=None, description="Limits and fair-share weight of this adapter's traffic (429 when over)."
    )
    replicas: int | None = Field(
        default=None,
        ge=0,
        le=REPLICAS_MAX,
        description="On how many live workers of the base model's pool the adapter is placed (prefetched, "
        "validated, held); the operator picks them by rendezvous hashing, skipping full workers, and names "
        "them in status.placement. 0: every worker of the pool. Unset: the pool's default (the workers' "
        "--default-replicas; 0, every worker, when none is set). Demand may add replicas up to the pool's "
        "--max-replicas (docs/operator.md).",
    )

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
    digest: str | None = Field(
        default=None,
        max_length=71,
        pattern=DIGEST_PATTERN,
        description="The files' digest as fetched, in spec.digest's form (copy it there to pin them).",
    )
    signer: str | None = Field(
        default=None, max_length=512, description="Who signed the files, when a signature was verified."
    )
    resolvedRevision: str | None = Field(default=None, max_length=255)
    chatTemplate: str | None = Field(
        default=None,
        max_length=64,
        description="Which chat template renders this adapter's chat requests: the adapter's own file "
        '(chat_template.jinja or tokenizer_config.json) or "base model".',
    )


class WorkerCounts(_Model):
    """How many live workers of the adapter's base model (those it is placed on, when it is placed)
    have it Ready or Failed."""

    ready: int = Field(default=0, ge=0)
    failed: int = Field(default=0, ge=0)
    total: int = Field(default=0, ge=0)


WorkerRef = Annotated[str, Field(max_length=317, description="namespace/name of a LoRAWorker.")]


class Placement(_Model):
    """Which workers hold the adapter (written by the operator when it has replicas; absent: every worker)."""

    replicas: int = Field(ge=1, le=REPLICAS_MAX, description="Workers it should be on now (demand included).")
    workers: list[WorkerRef] = Field(
        default_factory=list,
        max_length=REPLICAS_MAX,
        description="The workers it is placed on (namespace/name of their LoRAWorker): they prefetch, "
        "validate and serve it; the others ignore it.",
    )
    draining: list[WorkerRef] | None = Field(
        default=None,
        max_length=REPLICAS_MAX,
        description="Workers it moved away from, still serving it until the new ones have it Ready.",
    )
    reason: str | None = Field(default=None, max_length=128, description="Why it is placed as it is.")
    message: str | None = Field(default=None, max_length=1024, description="The last move and its cause.")


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
        description="Digest of the (path, revision, digest) that status.id was assigned to; a spec change "
        "that alters it is a new version of the weights and gets a new ID.",
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
    ready: str | None = Field(
        default=None,
        max_length=32,
        pattern=r"^[0-9]+/[0-9]+$",
        description="Ready workers / desired workers, as `kubectl get lora` shows it.",
    )
    placement: Placement | None = None
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
    maxAdapters: int | None = Field(
        default=None,
        ge=0,
        description="Adapters the operator may place on this worker (count); 0 or unset: as many as "
        "fit cacheBytes.",
    )


class PoolPlacement(_Model):
    """The pool's placement settings, as this worker was started with (every worker of a pool agrees)."""

    defaultReplicas: int = Field(
        default=0,
        ge=0,
        le=REPLICAS_MAX,
        description="Replicas of an adapter without spec.replicas; 0: every worker.",
    )
    maxReplicas: int = Field(
        default=0,
        ge=0,
        le=REPLICAS_MAX,
        description="Most replicas demand may raise an adapter to; 0: no demand scaling.",
    )


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
    placement: PoolPlacement | None = None


class WorkerAdapterReport(_Model):
    """One adapter version as this worker sees it, keyed by ID (the worker's /adapters endpoint; in the
    LoRAWorker status the same fields, less ``id`` and ``onDevice``, are the exceptions' details)."""

    id: AdapterId
    adapter: str = Field(max_length=317, description="namespace/name of the LoRAAdapter.")
    state: WorkerAdapterState
    reason: str | None = Field(default=None, max_length=128)
    message: str | None = Field(default=None, max_length=2048)
    onDevice: bool = False
    info: AdapterInfo | None = None


class WorkerAdapterDetail(_Model):
    """Why one adapter is not (plainly) Ready on this worker, or what it found in a fresh Ready one."""

    adapter: str = Field(max_length=317, description="namespace/name of the LoRAAdapter.")
    state: WorkerAdapterState
    reason: str | None = Field(default=None, max_length=128)
    message: str | None = Field(default=None, max_length=2048)
    info: AdapterInfo | None = None


RangeString = Annotated[str, Field(max_length=12000, pattern=ranges.RANGE_PATTERN)]
ID_BLOCKS_HELP = (
    f"Block map: the first ID of a block of {ranges.BLOCK} IDs -> the IDs of the block in this set, as ranges "
    '("1-40,42").'
)
MAX_DETAILS = 512  # entries of status.adapters (the schema's bound; the worker keeps fewer, see report.py)


class LoRAWorkerStatus(_Model):
    """Counts, the ID sets by state as range blocks, and details only for the exceptions."""

    # It stays small at tens of thousands of adapters: a change rewrites only its block's range string,
    # and details are kept for the Failed, those waiting with a reason (as many as fit) and the few
    # that became Ready last (what the worker found in their weights); see worker/report.py.

    heartbeatTime: str | None = Field(default=None, max_length=64, json_schema_extra={"format": "date-time"})
    ready: int = Field(default=0, ge=0, description="Adapters Ready on this worker.")
    failed: int = Field(default=0, ge=0, description="Adapters Failed on this worker.")
    loading: int = Field(
        default=0, ge=0, description="Adapters still Pending, Prefetching or Validating on this worker."
    )
    onDevice: int = Field(default=0, ge=0, description="Adapters in device slots now.")
    cacheBytesUsed: int = Field(default=0, ge=0)
    assigned: int | None = Field(
        default=None, ge=0, description="Adapters placed on this worker (or every one of its pool)."
    )
    waiting: dict[str, Annotated[int, Field(ge=0)]] | None = Field(
        default=None,
        max_length=16,
        description="Requests waiting per adapter ID, for the few adapters with the most (only those "
        "with some): the demand the operator scales replicas by.",
    )
    readyIds: dict[str, RangeString] | None = Field(
        default=None, description="IDs Ready on this worker. " + ID_BLOCKS_HELP
    )
    failedIds: dict[str, RangeString] | None = Field(
        default=None, description="IDs Failed on this worker. " + ID_BLOCKS_HELP
    )
    loadingIds: dict[str, RangeString] | None = Field(
        default=None, description="IDs Pending, Prefetching or Validating. " + ID_BLOCKS_HELP
    )
    onDeviceIds: RangeString | None = Field(default=None, description="IDs in device slots now, as ranges.")
    throttledIds: RangeString | None = Field(
        default=None,
        description="IDs of adapters that refused a request over their spec.limits on this worker lately "
        "(within its --throttled-seconds, default 60), as ranges (the 256 most recent).",
    )
    adapters: dict[str, WorkerAdapterDetail] | None = Field(
        default=None,
        max_length=MAX_DETAILS,
        description="Details by ID: every Failed adapter and every one waiting with a reason (as many as "
        "fit), and the few that became Ready last (what the worker found in the weights).",
    )

    def states(self) -> dict[int, str]:
        """ID -> Ready, Failed or Loading, from the ID sets."""
        out: dict[int, str] = {}
        for state, blocks in (
            ("Loading", self.loadingIds),
            ("Failed", self.failedIds),
            ("Ready", self.readyIds),
        ):
            for i in ranges.from_blocks(blocks):
                out[i] = state
        return out


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
