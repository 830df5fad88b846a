"""The adapter-residency series vLLM is adding upstream, published by both engines the same way.

Where they come from: vLLM PR #54830 ("[Metrics][LoRA] Publish LoRA load events and expose loaded
adapters in metrics", on top of #51433; it replaces the closed #45411 and answers issue #45325), not
in a tagged vLLM release yet (vLLM 0.32/0.33 have none of them). The Gateway API Inference Extension /
llm-d endpoint picker reads them for its residency-aware scorer (llm-d-router #2792,
``lora-load-state-scorer``; its model-server protocol doc, "LoRA Adapter Residency"):

- ``vllm:lora_adapter_loaded{model_name, engine, adapter_name, level, pinned}`` 1: one series per
  resident adapter, by served name, at its best level: ``gpu`` when it holds a device slot and can serve
  at once, else ``cpu`` when only the host cache holds it. Gone (not 0) once it is evicted.
  ``pinned`` is ``true`` for an adapter exempt from eviction (neither engine pins here: ``false``).
- ``vllm:num_gpu_loaded_lora_adapters{model_name, engine}``: adapters occupying device slots.
- ``vllm:num_cpu_loaded_lora_adapters{model_name, engine}``: adapters in the host cache; as in vLLM,
  where an adapter in a slot is always also registered in the CPU LRU, it counts the slot holders too.
- ``vllm:max_gpu_lora_adapters{model_name, engine}``: device slots (``max_loras``), there from startup.

``engine`` is vLLM's engine-core index: one engine core per worker, so ``"0"``. The counts include
a retired version still finishing its requests (it occupies its slot); the per-adapter series names
only the versions a new request would get (a retired one has no served name any more).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily, Metric

ENGINE_INDEX = "0"
"""The ``engine`` label of the ``vllm:`` gauges: vLLM's engine-core index (one per worker)."""

LOADED = "vllm:lora_adapter_loaded"
GPU_LOADED = "vllm:num_gpu_loaded_lora_adapters"
CPU_LOADED = "vllm:num_cpu_loaded_lora_adapters"
MAX_GPU = "vllm:max_gpu_lora_adapters"


@dataclass(frozen=True)
class Snapshot:
    """Which adapter IDs an engine holds where, and the served name of each ID it still serves."""

    gpu: frozenset[int] | set[int] = frozenset()
    """IDs in a device slot."""
    cpu: frozenset[int] | set[int] = frozenset()
    """IDs in the host cache, slot holders included (vLLM's registered adapters)."""
    names: Mapping[int, str] = field(default_factory=dict)
    """ID -> served name of the versions the engine serves (retired ones are absent)."""
    pinned: frozenset[int] | set[int] = frozenset()

    def levels(self) -> dict[str, tuple[str, bool]]:
        """Served name -> (its best level, pinned) for every resident version a request can reach."""
        out: dict[str, tuple[str, bool]] = {}
        for adapter_id in sorted(self.gpu | self.cpu):
            name = self.names.get(adapter_id)
            if name is None:
                continue
            level = "gpu" if adapter_id in self.gpu else "cpu"
            if name not in out or (level, out[name][0]) == ("gpu", "cpu"):  # two versions: the better one
                out[name] = (level, adapter_id in self.pinned)
        return out


def families(snapshot: Snapshot, model_name: str, max_loras: int) -> Iterable[Metric]:
    """The four residency families of ``snapshot`` for the engine serving ``model_name``."""
    base = [model_name, ENGINE_INDEX]
    loaded = GaugeMetricFamily(
        LOADED,
        "1 while a LoRA adapter is resident: level gpu (a device slot) or cpu (the host cache only); "
        "gone once evicted (vLLM #54830's meaning).",
        labels=["model_name", "engine", "adapter_name", "level", "pinned"],
    )
    for name, (level, pinned) in sorted(snapshot.levels().items()):
        loaded.add_metric([*base, name, level, "true" if pinned else "false"], 1.0)
    yield loaded
    for metric, doc, value in (
        (GPU_LOADED, "LoRA adapters occupying device slots.", len(snapshot.gpu)),
        (CPU_LOADED, "LoRA adapters in the host cache, those in device slots included.", len(snapshot.cpu)),
        (MAX_GPU, "Device slots for LoRA adapters (max_loras).", max_loras),
    ):
        g = GaugeMetricFamily(metric, doc, labels=["model_name", "engine"])
        g.add_metric(base, float(value))
        yield g
