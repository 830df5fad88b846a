"""The one interface both serving engines implement: the built-in torch engine and vLLM.

An engine knows nothing of Kubernetes or the registry: the worker (``serve.py``) wires them. It is
handed adapter *versions* as ``Adapter(id, name, path)`` with the cluster-unique ID as its key, loads
one before the control path reports it Ready (``add_adapter``), and forgets one once no request uses
it (``retire_adapter``). Requests come in as prompt token IDs, ``SamplingParams`` (the fields every
engine implements) and ``extras`` (optional features, each named in ``FEATURES``); the API refuses
with a 400 any extra an engine does not list in its ``features``, so no parameter is silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

if TYPE_CHECKING:
    from loraplane.crds.errors import LoraplaneError
    from loraplane.worker.engine.sampling import SamplingParams
    from loraplane.worker.fairness import Tenant

NON_FINITE_OUTPUT = "NonFiniteOutput"
"""The reason a request fails with when the engine computed NaN or Inf logits for it; on an adapter's
request the worker also quarantines that adapter version."""

Kind = Literal["builtin", "vllm"]
KINDS: tuple[Kind, ...] = ("builtin", "vllm")

FEATURES = frozenset(
    {
        "n",  # several choices per request
        "logprobs",  # per-token log probabilities (and top alternatives)
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "min_p",
        "logit_bias",
        "response_format",  # json_object / json_schema: structured output
        "tools",  # tool calling (api/tools.py): forced calls need structured output, "auto" a tool parser
    }
)
"""Request features beyond ``SamplingParams`` that an engine may implement (request field names)."""


@dataclass(frozen=True)
class Adapter:
    """One adapter version as an engine sees it."""

    id: int
    """The cluster-unique ID (LoRAAdapter status.id): the engine's key for weights, slots and KV."""
    name: str
    """The served name (the OpenAI ``model`` field)."""
    path: Path
    """The version's own cache directory (adapter_config.json + adapter_model.safetensors)."""
    max_length: int | None = None
    """spec.longContext.maxLength: prompt + output tokens allowed for this adapter."""
    chat_template: str | None = None
    """The adapter's own chat template (validation read it from its directory); None: the base model's."""


@dataclass
class Output:
    """What an engine produced for one choice of a request since the last output."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: LoraplaneError | None = None
    index: int = 0
    """The choice (0..n-1)."""
    logprobs: list[TokenLogprob] | None = None
    """One entry per token in ``token_ids`` when the request asked for logprobs."""


@dataclass
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]] = field(default_factory=list)


class Engine(Protocol):
    """What the worker's HTTP side and wiring use. ``load(kind, ...)`` builds one."""

    kind: Kind
    model_name: str
    features: frozenset[str]
    metrics: Any  # .requests (a labelled counter) and .render() -> Prometheus text

    @property
    def tokenizer(self) -> Any: ...

    @property
    def vocab_size(self) -> int: ...

    def limit_for(self, adapter: Adapter | None) -> tuple[int, str]:
        """(max prompt + output tokens, what sets it) for the base model (None) or an adapter."""
        ...

    def submit(
        self,
        *,
        request_id: str,
        model: str,
        adapter: Adapter | None,
        prompt_ids: list[int],
        params: SamplingParams,
        extras: dict[str, Any],
        on_output: Callable[[Output], None],
        tenant: Tenant | None = None,
    ) -> object:
        """Queue a request; ``on_output`` may be called from any thread. Raises LoraplaneError.
        ``tenant``: its fair-share flow, weight and priority (``fairness.py``; None: the default flow).
        What it returns is the engine's own (the built-in one returns its Request); callers ignore it."""
        ...

    def cancel(self, request_id: str) -> None: ...

    async def add_adapter(self, adapter: Adapter) -> None:
        """Load an adapter before it is served (warm). Raises LoraplaneError with the engine's reason."""
        ...

    def retire_adapter(self, adapter_id: int) -> None:
        """No new request will use this ID: drop it once the requests using it have finished."""
        ...

    async def adapter_ids(self) -> set[int]:
        """The adapter IDs the engine holds now (asked of the engine itself)."""
        ...

    def on_device(self) -> set[int]:
        """Adapter IDs in device slots now (cheap, any thread): the LoRAWorker report's ``loaded``."""
        ...

    def problem(self, stall_s: float) -> str | None:
        """Why the engine cannot serve (dead, or no step for ``stall_s``), or None: /health reads it."""
        ...

    def stop(self) -> None: ...


def limit_for(
    adapter: Adapter | None, *, max_model_len: int, max_position_embeddings: int
) -> tuple[int, str]:
    """The length bound of a request: the adapter's longContext.maxLength, else the base model's
    max_position_embeddings, never above the engine's max_model_len (its KV cache)."""
    if adapter is not None and adapter.max_length:
        if adapter.max_length <= max_model_len:
            return adapter.max_length, f"adapter {adapter.name!r} longContext.maxLength"
        return max_model_len, "the worker's max_model_len (below the adapter's longContext.maxLength)"
    if max_position_embeddings <= max_model_len:
        return max_position_embeddings, "the base model's max_position_embeddings"
    return max_model_len, "the worker's max_model_len"


async def start(kind: Kind, model_dir: Path, worker_settings: Any) -> Engine:
    """Load the base model into the engine a worker pool chose, on the running event loop (the vLLM
    engine serves from it; the built-in one loads in a thread and runs its own)."""
    if kind == "vllm":
        from loraplane.worker.vllm.engine import VllmEngine, VllmSettings

        return await VllmEngine.start(model_dir, VllmSettings.from_worker(worker_settings))
    import asyncio

    from loraplane.worker.engine.service import Engine as BuiltinEngine
    from loraplane.worker.engine.service import EngineSettings

    settings = EngineSettings.from_worker(worker_settings)
    return await asyncio.to_thread(BuiltinEngine.start, model_dir, settings)
