"""Prometheus metrics of the built-in engine, in one registry per engine (tests run several side by side).

Two kinds of series:

- ``loraplane_worker_*``: counters and histograms the engine thread and the HTTP side record
  (requests by outcome, tokens, time to first token, time per output token, queue time, end-to-end
  latency, batch size, adapter loads and evictions, engine steps), and each adapter's residency
  (``loraplane_worker_adapter_residency{model, id, tier}`` 1 or 0 for device, cpu and disk: vLLM has
  no such signal).
- The series routers read, under vLLM's names, labels and meaning (``inference/residency.py`` says where each
  comes from upstream): ``vllm:num_requests_waiting``, ``vllm:num_requests_running``,
  ``vllm:kv_cache_usage_perc`` (a fraction, 1 = full), ``vllm:lora_requests_info`` (value: when it
  was sampled; labels ``max_lora``, ``running_lora_adapters``, ``waiting_lora_adapters``:
  comma-separated served names), and the adapter residency vLLM is adding
  (``vllm:lora_adapter_loaded{adapter_name, level, pinned}``, ``vllm:num_gpu_loaded_lora_adapters``,
  ``vllm:num_cpu_loaded_lora_adapters``, ``vllm:max_gpu_lora_adapters``). The Gateway API Inference
  Extension's endpoint picker reads exactly these by default, so an InferencePool in front of
  built-in-engine workers needs no metric flags, and a pool that mixes both engines is scored on one
  scale. They are sampled at scrape time from the engine's own state, so they can never drift from it.

The ``model`` label is the served name (base model or adapter), bounded by the adapters registered on
this worker. No ``_created`` series (see ``loraplane.telemetry``).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

import loraplane.telemetry  # noqa: F401  (no _created series)
from loraplane.worker.inference import residency

if TYPE_CHECKING:
    from .service import Engine

PREFIX = "loraplane_worker_"
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_REQUEST_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TIERS = ("device", "cpu", "disk")


class Metrics:
    """The counters and histograms /metrics exposes, plus the engine state sampled at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.prompt_tokens = Counter(
            PREFIX + "prompt_tokens", "Prompt tokens of admitted requests", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            PREFIX + "generation_tokens", "Generated tokens", ["model"], registry=r
        )
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "From arrival at the engine to the first generated token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Mean time between generated tokens of a finished request",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            PREFIX + "request_queue_time_seconds",
            "From arrival at the engine to admission into the running batch (waiting for a slot, "
            "an adapter load, or KV cache)",
            ["model"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "From arrival at the engine to the request's end (finished, failed or cancelled)",
            ["model"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            PREFIX + "batch_size", "Sequences per engine step", buckets=_BATCH_BUCKETS, registry=r
        )
        self.adapter_loads = Counter(
            PREFIX + "adapter_loads", "Adapter loads into a tier (cpu, device)", ["tier"], registry=r
        )
        self.adapter_evictions = Counter(
            PREFIX + "adapter_evictions", "Adapter evictions from a tier (cpu, device)", ["tier"], registry=r
        )
        self.preemptions = Counter(
            PREFIX + "preemptions",
            "Running requests taken back for a flow under its fair share, by what became of their KV "
            "(kept: parked, resumes where it stopped; freed: reads prompt and output again)",
            ["kv"],
            registry=r,
        )
        self.recomputed_tokens = Counter(
            PREFIX + "recomputed_tokens", "Tokens read again because a preemption freed their KV", registry=r
        )

    def watch(self, engine: Engine) -> None:
        """Publish ``engine``'s queue, KV cache and adapter residency on every scrape."""
        self.registry.register(_EngineState(engine))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _copy(items: Iterable[object]) -> list:  # type: ignore[type-arg]
    """A copy of a list or dict the engine thread mutates; list() of one runs without releasing the GIL."""
    for _ in range(3):
        try:
            return list(items)
        except RuntimeError:  # changed size during the copy: take it again
            continue
    return []


class _EngineState(Collector):
    """Gauges read from the engine at scrape time (the scrape runs on the HTTP thread)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterable[Metric]:
        engine = self.engine
        scheduler, runner = engine.scheduler, engine.runner
        base = {"model_name": engine.model_name, "engine": residency.ENGINE_INDEX}
        running = _copy(scheduler.running)
        # Waiting: taken into the scheduler's list, or still in its inbox (submitted since the last step).
        inbox = [r for r in _copy(getattr(scheduler, "_inbox", ())) if not isinstance(r, int)]
        waiting = _copy(scheduler.waiting) + inbox

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=list(base))
            g.add_metric(list(base.values()), value)
            return g

        yield gauge(
            "vllm:num_requests_waiting",
            "Requests waiting to be admitted into the running batch (vLLM's meaning).",
            scheduler.queued,
        )
        yield gauge(
            "vllm:num_requests_running", "Requests in the running batch (vLLM's meaning).", len(running)
        )
        kv = runner.kv
        total = kv.num_blocks * kv.block_size
        yield gauge(
            "vllm:kv_cache_usage_perc",
            "Fraction of the KV cache reserved by admitted sequences; 1 means full (vLLM's meaning).",
            1.0 - kv.free_tokens / total if total else 0.0,
        )
        info = GaugeMetricFamily(
            "vllm:lora_requests_info",
            "Running and waiting adapters (served names, comma-separated); the value is when this was "
            "sampled (vLLM's meaning).",
            labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"],
        )
        names = {
            "running": sorted({r.model for r in running if r.adapter_id is not None}),
            "waiting": sorted({r.model for r in waiting if r.adapter_id is not None}),
        }
        info.add_metric(
            [str(runner.max_loras), ",".join(names["running"]), ",".join(names["waiting"])], time.time()
        )
        yield info
        steps = CounterMetricFamily(
            PREFIX + "engine_steps", "Engine iterations (one batched forward pass each)", labels=[]
        )
        steps.add_metric([], scheduler.steps)
        yield steps
        tiers = engine.tiers
        on = {"device": set(_copy(tiers.slot_of)), "cpu": set(_copy(tiers.cpu))}
        known = _known_adapters(engine)
        served = {i: name for i, (name, _) in known.items()}
        snapshot = residency.Snapshot(gpu=on["device"], cpu=on["cpu"] | on["device"], names=served)
        yield from residency.families(snapshot, engine.model_name, runner.max_loras)
        yield from self._residency(known, on)

    def _residency(
        self, known: dict[int, tuple[str, Path | None]], on: dict[str, set[int]]
    ) -> Iterable[Metric]:
        on["disk"] = {i for i, (_, path) in known.items() if path is not None and Path(path).is_dir()}
        fam = GaugeMetricFamily(
            PREFIX + "adapter_residency",
            "1 where an adapter version's weights are held: device (a slot), cpu (host memory), disk "
            "(the worker's cache); 0 where they are not.",
            labels=["model", "id", "tier"],
        )
        for adapter_id in sorted(set(known) | on["device"] | on["cpu"]):
            model = known.get(adapter_id, ("", None))[0]  # "": retired, its last requests draining
            for tier in TIERS:
                fam.add_metric([model, str(adapter_id), tier], 1.0 if adapter_id in on[tier] else 0.0)
        yield fam


def _known_adapters(engine: Engine) -> dict[int, tuple[str, Path | None]]:
    """Adapter ID -> (served name, cache directory) of the versions the engine was given (add_adapter)."""
    return {a.id: (a.name, a.path) for a in list(engine.adapters.values())}
