"""The engine as one object the worker process starts: runner + adapter tiers + the scheduler thread.

``Engine.start(model_dir, settings)`` loads the base model and starts the engine thread. It implements
``loraplane.worker.inference.engines.Engine`` and knows nothing of the registry: the worker calls
``retire_adapter`` when a version will get no new requests (its CPU and device copies are dropped
once no admitted request uses it). The HTTP side calls ``submit`` from its event loop; ``limit_for``
gives the length bound a request is checked against: the adapter's longContext.maxLength, else the
base model's max_position_embeddings, never above the KV cache's max_model_len.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from loraplane.errors import PermanentError

from ..inference import engines
from ..inference.engines import LoraSpec, Output
from ..inference.fairness import DEFAULT, Tenant
from ..inference.sampling import SamplingParams
from . import heap
from .metrics import Metrics
from .runner import ModelRunner
from .scheduler import Request, Scheduler, SchedulerSettings
from .tiers import AdapterTiers

_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineSettings:
    """How the engine is sized (the worker builds it from its settings: settings.EngineConfig.builtin)."""

    device: str = "cpu"
    """Torch device: cpu, cuda, cuda:N, or auto (cuda when available)."""
    dtype: str = "auto"
    """Weights dtype: auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16 or float16."""
    max_loras: int = 8
    """Device slots for adapters (count)."""
    max_lora_rank: int = 64
    """Largest LoRA rank a slot holds (rank)."""
    max_cpu_loras: int = 64
    """Adapters kept in CPU memory (count), LRU."""
    max_model_len: int | None = None
    """Tokens per sequence in the KV cache (prompt + output); default min(max_position_embeddings, 4096)."""
    served_model_name: str = ""
    """The base model's name in the OpenAI ``model`` field; default the checkpoint directory's name."""
    kv_cache_bytes: int = 0
    """KV cache memory budget (bytes); 0: on GPU the free memory after loading less 10% of the total,
    on CPU a quarter of the available memory; never more than max_num_seqs x max_model_len tokens."""
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    """Batch and queue bounds."""


class Engine:
    """Owns the model runner, the adapter tiers and the engine thread."""

    def __init__(self, runner: ModelRunner, settings: EngineSettings, *, model_name: str) -> None:
        # Freed step activations leave RSS; a decode step's logits stay in the heap (see heap.py).
        heap.fix_mmap_threshold(
            heap.step_threshold(settings.scheduler.max_num_seqs, runner.config.vocab_size)
        )
        self.runner = runner
        self.settings = settings
        self.model_name = model_name
        self.adapters: dict[int, LoraSpec] = {}  # the versions handed over by add_adapter, by ID
        self.metrics = Metrics()
        self.tiers = AdapterTiers(runner, max_cpu_loras=settings.max_cpu_loras, metrics=self.metrics)
        self.scheduler = Scheduler(runner, self.tiers, self.metrics, settings.scheduler)
        self.metrics.watch(self)
        self._thread = threading.Thread(target=self.scheduler.run, name="loraplane-engine", daemon=True)

    @classmethod
    def load(cls, model_dir: Path, settings: EngineSettings) -> Engine:
        """Load the base model; the engine thread is not started yet (see ``run``)."""
        device = settings.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if settings.dtype not in _DTYPES:
            raise PermanentError(
                "InvalidSettings", f"dtype {settings.dtype!r} is not one of {', '.join(_DTYPES)}"
            )
        runner = ModelRunner(
            Path(model_dir),
            device=device,
            dtype=_DTYPES[settings.dtype],
            max_loras=settings.max_loras,
            max_lora_rank=settings.max_lora_rank,
            max_seqs=settings.scheduler.max_num_seqs,
            max_model_len=settings.max_model_len,
            kv_cache_bytes=settings.kv_cache_bytes,
        )
        engine = cls(runner, settings, model_name=settings.served_model_name or Path(model_dir).name)
        return engine

    @classmethod
    def start(cls, model_dir: Path, settings: EngineSettings) -> Engine:
        """Load the base model and start the engine thread."""
        engine = cls.load(model_dir, settings)
        engine.run()
        return engine

    def run(self) -> None:
        """Start the engine thread (``load`` leaves it stopped: tests fill the queue first)."""
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still queued or running end with ShuttingDown."""
        self.scheduler.stop()
        if self._thread.is_alive():
            self._thread.join(timeout)
        elif self._thread.ident is None:
            self.scheduler.run()  # never started: only fails what is queued, then returns
        self.tiers.close()

    @property
    def tokenizer(self) -> Any:
        return self.runner.tokenizer

    kind: engines.Kind = "builtin"
    features: frozenset[str] = frozenset()  # none of engines.FEATURES: the API refuses them by name

    @property
    def vocab_size(self) -> int:
        return int(self.runner.config.vocab_size)

    def limit_for(self, adapter: LoraSpec | None) -> tuple[int, str]:
        """(max prompt + output tokens, what sets it) for the base model (None) or an adapter."""
        return engines.limit_for(
            adapter,
            max_model_len=self.runner.max_model_len,
            max_position_embeddings=self.runner.config.max_position_embeddings,
        )

    def submit(
        self,
        *,
        request_id: str,
        model: str,
        adapter: LoraSpec | None,
        prompt_ids: list[int],
        params: SamplingParams,
        on_output: Callable[[Output], None],
        extras: dict[str, Any] | None = None,
        tenant: Tenant | None = None,
    ) -> Request:
        """Queue a request for the base model (adapter None) or an adapter version (kept by its ID).
        ``extras`` must be empty: this engine implements none of ``engines.FEATURES``.

        Raises PermanentError PromptTooLong (the limit named), TemporaryError QueueFull.
        """
        if extras:
            raise PermanentError("UnsupportedParameter", f"not implemented here: {', '.join(extras)}")
        limit, source = self.limit_for(adapter)
        if self.runner.kv.total_tokens < limit:  # a KV budget smaller than one max-length sequence
            limit, source = self.runner.kv.total_tokens, "the size of this worker's KV cache"
        engines.check_prompt(prompt_ids, params.max_tokens, limit, source)
        request = Request(
            request_id=request_id,
            model=model,
            adapter_id=None if adapter is None else adapter.id,
            local_dir=None if adapter is None else adapter.path,
            prompt_ids=list(prompt_ids),
            params=params,
            max_len=limit,
            on_output=on_output,
            tenant=tenant or DEFAULT,
        )
        self.scheduler.submit(request)
        return request

    def problem(self, stall_s: float) -> str | None:
        """Why this engine cannot serve, or None: its thread ended, or its loop has not come round in
        ``stall_s`` seconds (a hung step). /health reports it so that Kubernetes restarts the pod."""
        if self._thread.ident is None:
            return None  # not started yet (run() follows load(); tests fill the queue in between)
        if not self._thread.is_alive():
            return "the engine thread is not running"
        age = time.monotonic() - self.scheduler.beat
        if age > stall_s:
            return f"the engine loop has not come round for {age:.0f} s (limit {stall_s:g} s)"
        return None

    def cancel(self, request_id: str) -> None:
        self.scheduler.cancel(request_id)

    async def add_adapter(self, adapter: LoraSpec) -> None:
        """Record the version (metrics show where its weights are). The validator read the weights; the
        engine thread loads them into CPU memory and a device slot at the first request (tiers.py)."""
        self.adapters[adapter.id] = adapter

    def retire_adapter(self, adapter_id: int) -> None:
        # No new requests: free its CPU and device copies after the last admitted one.
        self.adapters.pop(adapter_id, None)
        self.scheduler.drop_adapter(adapter_id)

    async def adapter_ids(self) -> set[int]:
        return self.on_device()

    def on_device(self) -> set[int]:
        return set(self.tiers.slot_of)  # one C-level copy: safe across threads

    def waiting_by_adapter(self) -> dict[int, int]:
        """Requests waiting to be admitted, per adapter ID (the demand the operator scales replicas by)."""
        out: dict[int, int] = {}
        queued = [*list(self.scheduler.waiting), *list(self.scheduler._inbox)]  # C-level copies
        for r in queued:
            adapter_id = getattr(r, "adapter_id", None)
            if adapter_id is not None:
                out[adapter_id] = out.get(adapter_id, 0) + 1
        return out
