"""The series a router reads from /metrics follow the engine's state, with vLLM's names and meaning.

The engine thread is not started: requests go to the engine as the HTTP side hands them over and the
test thread runs its iterations, so "one request running on the only slot, one waiting for it" is a
state the test holds still while it scrapes the real /metrics, parsed with prometheus_client's parser.
"""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families
from support.api import BASE, MakeServer
from support.procs import wait_for

from loraplane.worker.inference.engines import Output
from loraplane.worker.inference.sampling import SamplingParams

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(url: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def one(samples: Samples, name: str) -> tuple[dict[str, str], float]:
    assert len(samples.get(name, [])) == 1, (name, samples.get(name))
    return samples[name][0]


def residency(samples: Samples) -> dict[tuple[str, str], float]:
    return {(lb["model"], lb["tier"]): v for lb, v in samples["loraplane_worker_adapter_residency"]}


def loaded(samples: Samples) -> dict[str, str]:
    """vLLM's residency series: served name -> level, with the labels vLLM gives them."""
    out = {}
    for lb, v in samples.get("vllm:lora_adapter_loaded", []):
        assert (lb["model_name"], lb["engine"], lb["pinned"], v) == (BASE, "0", "false", 1.0), lb
        out[lb["adapter_name"]] = lb["level"]
    return out


def counts(samples: Samples) -> tuple[float, float, float]:
    return tuple(  # type: ignore[return-value]
        one(samples, f"vllm:{n}")[1]
        for n in ("num_gpu_loaded_lora_adapters", "num_cpu_loaded_lora_adapters", "max_gpu_lora_adapters")
    )


def test_router_series_follow_the_engine(make_server: MakeServer, adapters: dict[str, Path]) -> None:
    s = make_server(start=False, max_loras=1, max_num_seqs=4)
    s.add(21, "m0", adapters["a0"])
    s.add(22, "m1", adapters["a1"])
    idle = scrape(s.url)
    assert one(idle, "vllm:num_requests_waiting") == ({"model_name": BASE, "engine": "0"}, 0.0)
    assert one(idle, "vllm:num_requests_running")[1] == 0.0
    assert one(idle, "vllm:kv_cache_usage_perc")[1] == 0.0
    info, _ = one(idle, "vllm:lora_requests_info")
    assert info == {"max_lora": "1", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert residency(idle) == {
        (m, t): 1.0 if t == "disk" else 0.0 for m in ("m0", "m1") for t in ("device", "cpu", "disk")
    }
    assert loaded(idle) == {} and counts(idle) == (0.0, 0.0, 1.0), "registered, not yet loaded"
    assert not any(k.endswith("_created") for k in idle), "no _created series"

    # Two requests go to the engine as the HTTP side hands them over; this thread runs its iterations.
    finished: dict[str, Output] = {}

    def submit(model: str, max_tokens: int) -> None:
        def on_output(out: Output) -> None:
            if out.finish_reason is not None:
                finished[model] = out

        s.engine.submit(
            request_id=f"r-{model}",
            model=model,
            adapter=s.registry.lookup(model).lora_spec(),
            prompt_ids=[1, 5, 9],
            params=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
            on_output=on_output,
        )

    submit("m0", 40)
    submit("m1", 3)
    queued = scrape(s.url)
    assert one(queued, "vllm:num_requests_waiting")[1] == 2.0
    assert one(queued, "vllm:lora_requests_info")[0]["waiting_lora_adapters"] == "m0,m1"

    sched = s.engine.scheduler

    def step() -> bool:  # one engine iteration on this thread, as the engine thread would run it
        with sched._cond:
            inbox = list(sched._inbox)
            sched._inbox.clear()
        sched.iteration(inbox, set())
        return bool(sched.running)

    wait_for(step, 20, "m0 admitted into the only slot", interval=0.01)
    busy = scrape(s.url)
    assert one(busy, "vllm:num_requests_running")[1] == 1.0
    assert one(busy, "vllm:num_requests_waiting")[1] == 1.0
    info, stamp = one(busy, "vllm:lora_requests_info")
    assert (info["running_lora_adapters"], info["waiting_lora_adapters"]) == ("m0", "m1")
    assert stamp > one(idle, "vllm:lora_requests_info")[1], "the value is the time it was sampled"
    assert 0.0 < one(busy, "vllm:kv_cache_usage_perc")[1] < 1.0
    where = residency(busy)
    assert (where["m0", "device"], where["m0", "cpu"], where["m1", "device"]) == (1.0, 1.0, 0.0)
    assert loaded(busy)["m0"] == "gpu" and counts(busy)[0] == 1.0

    s.engine.run()
    wait_for(lambda: len(finished) == 2, 60, "both requests to finish")
    assert {m: (o.finish_reason, o.completion_tokens) for m, o in finished.items()} == {
        "m0": ("length", 40),
        "m1": ("length", 3),
    }
    done = wait_for(
        lambda: (d := scrape(s.url)) and one(d, "vllm:num_requests_running")[1] == 0 and d, 10, "idle"
    )
    assert one(done, "vllm:num_requests_waiting")[1] == 0.0
    assert one(done, "vllm:kv_cache_usage_perc")[1] == 0.0
    assert one(done, "loraplane_worker_engine_steps_total")[1] >= 40
    # m1 took the only slot from m0, whose weights stay in the host cache: both resident, idle.
    assert loaded(done) == {"m0": "cpu", "m1": "gpu"} and counts(done) == (1.0, 2.0, 1.0)
    queue = {lb["model"]: v for lb, v in done["loraplane_worker_request_queue_time_seconds_count"]}
    e2e = {lb["model"]: v for lb, v in done["loraplane_worker_e2e_request_latency_seconds_count"]}
    assert queue == e2e == {"m0": 1.0, "m1": 1.0}
    waited = {lb["model"]: v for lb, v in done["loraplane_worker_request_queue_time_seconds_sum"]}
    assert waited["m1"] > waited["m0"], "m1 waited for m0 to free the only slot"
