"""Prometheus metrics of the serving path, in one registry per engine (tests run several side by side).

The engine thread records batch sizes, tokens, latencies and adapter loads; the HTTP side records
request outcomes. The ``model`` label is the served name (base model or adapter), whose number is
bounded by the adapters registered on this worker.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    """The counters and histograms /metrics exposes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "loraplane_requests", "Finished requests by outcome", ["model", "status"], registry=r
        )
        self.prompt_tokens = Counter(
            "loraplane_prompt_tokens", "Prompt tokens of admitted requests", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "loraplane_generation_tokens", "Generated tokens", ["model"], registry=r
        )
        self.ttft = Histogram(
            "loraplane_time_to_first_token_seconds",
            "From admission to the first generated token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "loraplane_time_per_output_token_seconds",
            "Mean time between generated tokens of a finished request",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "loraplane_batch_size", "Sequences per engine step", buckets=_BATCH_BUCKETS, registry=r
        )
        self.adapter_loads = Counter(
            "loraplane_adapter_loads", "Adapter loads into a tier (cpu, device)", ["tier"], registry=r
        )
        self.adapter_evictions = Counter(
            "loraplane_adapter_evictions", "Adapter evictions from a tier (cpu, device)", ["tier"], registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
