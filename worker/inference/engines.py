"""The one interface both serving engines implement: the built-in torch engine and vLLM.

An engine knows nothing of Kubernetes or the registry: the worker (``assembly.py``) wires them. It is
handed adapter *versions* as ``LoraSpec(id, name, path)`` with the cluster-unique ID as its key, loads
one before the control path reports it Ready (``add_adapter``), and forgets one once no request uses
it (``retire_adapter``). Requests come in as prompt token IDs, ``SamplingParams`` (the fields every
engine implements) and ``extras`` (optional features, each named in ``FEATURES``); the API refuses
with a 400 any extra an engine does not list in its ``features``, so no parameter is silently ignored.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from loraplane.errors import PermanentError

if TYPE_CHECKING:
    from loraplane.errors import LoraplaneError
    from loraplane.worker.inference.fairness import Tenant
    from loraplane.worker.inference.sampling import SamplingParams

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
class LoraSpec:
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
    metrics: Any  # .render() -> Prometheus text of the engine's own series

    @property
    def tokenizer(self) -> Any: ...

    @property
    def vocab_size(self) -> int: ...

    def limit_for(self, adapter: LoraSpec | None) -> tuple[int, str]:
        """(max prompt + output tokens, what sets it) for the base model (None) or an adapter."""
        ...

    def submit(
        self,
        *,
        request_id: str,
        model: str,
        adapter: LoraSpec | None,
        prompt_ids: list[int],
        params: SamplingParams,
        extras: dict[str, Any],
        on_output: Callable[[Output], None],
        tenant: Tenant | None = None,
    ) -> object:
        """Queue a request; ``on_output`` may be called from any thread. Raises LoraplaneError.
        ``tenant``: its fair-share flow, weight and priority (``inference/fairness.py``; None: the default flow).
        What it returns is the engine's own (the built-in one returns its Request); callers ignore it."""
        ...

    def cancel(self, request_id: str) -> None: ...

    async def add_adapter(self, adapter: LoraSpec) -> None:
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

    def waiting_by_adapter(self) -> dict[int, int]:
        """Requests accepted and not yet running, per adapter ID (cheap, any thread): the LoRAWorker
        report's ``waiting``, the demand the operator scales replicas by."""
        ...

    def problem(self, stall_s: float) -> str | None:
        """Why the engine cannot serve (dead, or no step for ``stall_s``), or None: /health reads it."""
        ...

    def stop(self) -> None: ...


class EngineSlot:
    """The worker's engine, which starts after the other parts: the HTTP server answers /health and the
    control path validates adapters while the base model loads. The parts are built with the slot and
    read the engine from it; the assembly fills it once, when the engine can serve."""

    def __init__(self, engine: Engine | None = None) -> None:
        self.engine = engine
        self._filled = asyncio.Event()
        if engine is not None:
            self._filled.set()

    def fill(self, engine: Engine) -> None:
        assert self.engine is None, "an engine slot is filled once"
        self.engine = engine
        self._filled.set()

    def filled(self) -> bool:
        return self.engine is not None

    async def wait(self) -> Engine:
        """The engine, once it can serve."""
        await self._filled.wait()
        assert self.engine is not None
        return self.engine

    def on_device(self) -> set[int] | None:
        """The engine's adapter IDs in device slots (the report's ``loaded``); None before it starts."""
        return None if self.engine is None else self.engine.on_device()

    def retire_adapter(self, adapter_id: int) -> None:
        """No new request will use this version (an engine that has not started holds none)."""
        if self.engine is not None:
            self.engine.retire_adapter(adapter_id)


def limit_for(
    adapter: LoraSpec | None, *, max_model_len: int, max_position_embeddings: int
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


def check_prompt(prompt_ids: list[int], max_tokens: int | None, limit: int, source: str) -> None:
    """Refuse an empty prompt (EmptyPrompt), and one whose tokens plus ``max_tokens`` (1 when unset)
    exceed ``limit`` (PromptTooLong, naming the limit and ``source``, what sets it)."""
    if not prompt_ids:
        raise PermanentError("EmptyPrompt", "the prompt is empty; send at least one token")
    wanted = len(prompt_ids) + (max_tokens or 1)
    if wanted > limit:
        raise PermanentError(
            "PromptTooLong",
            f"the prompt ({len(prompt_ids)} tokens) plus max_tokens ({max_tokens or 1}) is "
            f"{wanted} tokens, above the limit of {limit} set by {source}; shorten the prompt or "
            "lower max_tokens",
        )
