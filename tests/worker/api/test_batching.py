"""Continuous batching and adapter tiers through the HTTP API, checked against PEFT.

Requests over more adapters than device slots (and than CPU capacity) join and leave the batch at
different times; each greedy output must equal PEFT's greedy output for that request's adapter.
Then the tiers on their own: LRU evictions counted, an adapter in use never evicted, removed IDs
dropped only after their last request.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import torch
from support.api import BASE, MakeServer, reference_greedy, reference_text

from loraplane.errors import LoraplaneError
from loraplane.worker.builtin.metrics import Metrics
from loraplane.worker.builtin.runner import ModelRunner
from loraplane.worker.builtin.tiers import AdapterTiers

# (served model, PEFT adapter or None, prompt token IDs, max_tokens, start delay in s)
REQUESTS = [
    ("m0", "a0", [1, 5, 9, 33, 47], 12, 0.0),
    ("m2", "a2", [1, 200, 12], 16, 0.0),
    (BASE, None, [1, 7, 7, 64, 65, 66], 8, 0.01),
    ("m1", "a1", [1, 42, 43], 10, 0.02),
    ("m3", "a3", [1, 250, 251, 252, 3], 7, 0.03),
    ("m4", "a4", [1, 99], 14, 0.05),
    ("m2", "a2", [1, 11, 22, 33], 5, 0.05),
    ("m0", "a0", [1, 120, 121, 122, 123, 124, 125, 126], 9, 0.08),
    ("m3", "a3", [1, 17], 11, 0.1),
    ("m1", "a1", [1, 60, 61], 6, 0.12),
]


def _counter(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def test_requests_joining_and_leaving_match_peft(
    make_server: MakeServer, adapters: dict[str, Path], peft_model: Any
) -> None:
    # 5 adapters over 2 device slots and 3 CPU entries; at most 4 sequences run at once.
    s = make_server(max_loras=2, max_cpu_loras=3, max_num_seqs=4)
    for i, name in enumerate(sorted(adapters)):
        s.add(10 + i, "m" + name[1:], adapters[name])
    c = openai.OpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)

    def run(req: tuple[str, str | None, list[int], int, float]) -> tuple[str, int]:
        model, _, prompt, max_tokens, delay = req
        time.sleep(delay)
        got = c.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return got.choices[0].text, got.usage.completion_tokens

    with ThreadPoolExecutor(len(REQUESTS)) as pool:
        results = list(pool.map(run, REQUESTS))
    tok = s.engine.tokenizer
    eos = set(s.engine.runner.config.eos_token_id)
    for (model, adapter, prompt, max_tokens, _), (text, n) in zip(REQUESTS, results, strict=True):
        want = reference_greedy(peft_model, adapter, prompt, max_tokens, eos)
        assert (text, n) == (reference_text(tok, want, eos), len(want)), (model, prompt)
    metrics = s.engine.metrics.render().decode()
    assert _counter(metrics, 'loraplane_worker_adapter_loads_total{tier="cpu"}') >= 5
    assert _counter(metrics, 'loraplane_worker_adapter_evictions_total{tier="cpu"}') >= 2
    assert _counter(metrics, 'loraplane_worker_adapter_evictions_total{tier="device"}') >= 3
    assert _counter(metrics, "loraplane_worker_batch_size_sum") > _counter(
        metrics, "loraplane_worker_batch_size_count"
    )
    assert s.engine.tiers.running == {} and s.engine.tiers.refs == {}


@pytest.fixture
def tiers(tiny_llama: Path) -> Any:
    runner = ModelRunner(tiny_llama, max_loras=2, max_lora_rank=16, max_seqs=4, max_model_len=64)
    t = AdapterTiers(runner, max_cpu_loras=2, metrics=Metrics())
    yield t
    t.close()


def _resident(t: AdapterTiers, adapter_id: int, path: Path) -> int | None:
    """ensure() until the loader thread finished (bounded); the slot, or None if none is free."""
    for _ in range(400):
        slot = t.ensure(adapter_id, path)
        if slot is not None or adapter_id in t.cpu:
            return slot
        threading.Event().wait(0.01)
    raise AssertionError(f"adapter {adapter_id} did not load")


def test_in_use_adapter_is_never_evicted(tiers: AdapterTiers, adapters: dict[str, Path]) -> None:
    t = tiers
    s1 = _resident(t, 1, adapters["a0"])
    s2 = _resident(t, 2, adapters["a1"])
    assert {s1, s2} == {0, 1}
    for adapter_id in (1, 2):
        t.admit(adapter_id)
        t.start(adapter_id)
    assert _resident(t, 3, adapters["a2"]) is None  # both slots serve running requests
    assert t.slot_of == {1: s1, 2: s2}
    t.finish(1, started=True)
    assert t.ensure(3, adapters["a2"]) == s1  # the idle one is the LRU victim
    assert t.runner.slot_adapter[s1] == 3
    assert list(t.cpu) == [2, 3]  # CPU tier is LRU over 2 entries: ID 1 left it
    counts = t.metrics.render().decode()
    assert _counter(counts, 'loraplane_worker_adapter_evictions_total{tier="device"}') == 1
    assert _counter(counts, 'loraplane_worker_adapter_evictions_total{tier="cpu"}') == 1
    assert _counter(counts, 'loraplane_worker_adapter_loads_total{tier="device"}') == 3


def test_removed_adapter_leaves_after_its_last_request(
    tiers: AdapterTiers, adapters: dict[str, Path]
) -> None:
    t = tiers
    slot = _resident(t, 5, adapters["a3"])
    t.admit(5)
    t.start(5)
    t.remove(5)
    assert t.slot_of == {5: slot} and 5 in t.cpu  # still serving its running request
    t.finish(5, started=True)
    assert t.slot_of == {} and 5 not in t.cpu and slot in t.free_slots
    assert float(t.runner.lora.scaling[slot]) == 0.0


def test_bad_adapter_fails_its_request_without_evicting(
    tiers: AdapterTiers, tmp_path: Path, adapters: dict[str, Path]
) -> None:
    t = tiers
    good = _resident(t, 1, adapters["a0"])
    _resident(t, 2, adapters["a1"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text('{"r": 4, "lora_alpha": 8}')
    with pytest.raises(LoraplaneError) as err:
        for _ in range(400):
            t.ensure(9, bad)
            threading.Event().wait(0.01)
    assert (
        err.value.reason == "FileMissing"
    )  # the validator's reason: both read through worker/inference/peft.py
    assert t.slot_of[1] == good and torch.count_nonzero(t.runner.lora.scaling) == 2
