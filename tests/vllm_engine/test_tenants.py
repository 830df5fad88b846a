"""Tenants on a vLLM worker process: limits with 429, fair share between adapters and keys, priorities.

One worker with ``--engine vllm`` (one engine for the module, vLLM running at most 4 sequences) serves
two adapters, with IDs assigned by the test as the operator would, and API keys with tenant fields.
The limits are the HTTP side's (engine-neutral): one check here that they hold on vLLM too. Fair share
is the worker's short-queue release with preemption (vllm/engine.py): a victim's short request beside
an aggressor's flood takes a row back from a running aggressor request (aborted in vLLM, resubmitted
later with its output as prompt), so its time to first token stays near its own solo figure instead of
waiting for an aggressor request to finish; the aggressor's answers, preempted and resumed, are checked
equal to the request alone. The requests held for a row are the demand the LoRAWorker reports in
``status.waiting``.
"""

from __future__ import annotations

import statistics
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from support import fleet, latency, models
from vllm_engine.test_worker import BASE, PROMPT, SHAPE, VLLM_ARGS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PLAIN, OTHER, BULK = "plain-key-0001", "other-key-0001", "bulk-key-00001"
KEYS = f"{PLAIN}\n{OTHER} tenant=other\n{BULK} tenant=bulk priority=batch\n"
LONG = 300  # the aggressor's output tokens: waiting for one of 4 to finish is tens of victim TTFTs
BOUND = 4.0  # the victim's median TTFT beside the flood over its own solo median (fair share: ~1-2)


class Worker:
    def __init__(self, proc: fleet.WorkerProc, ads: fleet.Adapters) -> None:
        self.proc, self.ads = proc, ads
        self.url = f"http://127.0.0.1:{proc.port}/v1"

    def client(self, key: str = PLAIN) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=600)


@pytest.fixture(scope="module")
def worker(kube: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    root = tmp_path_factory.mktemp("vllm-tenants")
    base = models.make_tiny_llama(root / "models" / BASE, **SHAPE)
    paths = {
        n: models.make_peft_adapter(base, root / "adapters" / n, r=4, alpha=8, seed=i)
        for i, n in enumerate(("v0", "v1"))
    }
    (root / "keys").write_text(KEYS)
    kube.apply_crds()
    namespace = kube.create_namespace("vllm-tenants")
    ads = fleet.Adapters(kube, namespace)
    for i, (name, path) in enumerate(paths.items()):
        ads.create(fleet.adapter_obj(name, f"file://{path}"))
        ads.assign(name, 9200 + i)
    proc = fleet.WorkerProc(
        kube.kubeconfig, root, name="vllm-tenants", namespace=namespace, base_dir=base,
        local_root=root / "adapters",
        extra=[
            "--mode", "serve", "--engine", "vllm", "--device", "cpu", "--dtype", "float32",
            "--max-loras", "2", "--max-lora-rank", "16", "--max-model-len", "1024",
            f"--vllm-args={VLLM_ARGS} --max-num-seqs=4", "--api-key-file", str(root / "keys"),
            "--heartbeat-seconds", "2",  # status.waiting is written with the heartbeat
        ],
    )  # fmt: skip
    try:
        with proc:
            w = Worker(proc, ads)

            def served() -> bool:
                try:
                    return {"v0", "v1"} <= {m.id for m in w.client().models.list().data}
                except openai.APIError:
                    return False

            fleet.wait_for(served, 600, lambda: proc.log()[-4000:])
            yield w
    finally:
        ads.close()
        kube.delete_namespace(namespace)


def complete(client: openai.OpenAI, model: str, max_tokens: int) -> str:
    out = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
    )
    return out.choices[0].text


def ttft(client: openai.OpenAI, model: str) -> float:
    return latency.ttft(client, model, PROMPT)


def preemptions(w: Worker) -> float:
    text = httpx.get(w.url.removesuffix("/v1") + "/metrics", timeout=30).text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("loraplane_worker_preemptions_total ")
    )


def streamed(client: openai.OpenAI, model: str, max_tokens: int) -> tuple[str, int]:
    """(text, completion tokens) of a streamed greedy completion."""
    stream = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    text, tokens = "", 0
    for chunk in stream:
        text += "".join(c.text for c in chunk.choices)
        tokens = chunk.usage.completion_tokens if chunk.usage else tokens
    return text, tokens


def beside_flood(
    w: Worker, victim: openai.OpenAI, model: str, aggressor: openai.OpenAI, agg_model: str
) -> tuple[float, float]:
    """(the victim's median TTFT alone, beside 8 aggressor requests of LONG tokens on vLLM's 4 rows).

    Every aggressor answer (non-streamed, and streamed chunk by chunk, preempted or not) must equal
    the request alone, with usage counting each token once."""
    alone = complete(aggressor, agg_model, LONG)
    ttft(victim, model)  # warm
    solo = statistics.median(ttft(victim, model) for _ in range(6))
    stop = threading.Event()
    answers: list[tuple[str, int]] = []

    def flood(i: int) -> None:
        while not stop.is_set():
            if i % 2:
                answers.append(streamed(aggressor, agg_model, LONG))
            else:
                answers.append((complete(aggressor, agg_model, LONG), LONG))

    threads = [threading.Thread(target=flood, args=(i,), daemon=True) for i in range(8)]
    for t in threads:
        t.start()
    fleet.wait_for(lambda: len(answers) >= 2, 300, "the flood running")
    try:
        loaded = statistics.median(ttft(victim, model) for _ in range(8))
    finally:
        stop.set()
        for t in threads:
            t.join(300)
    wrong = [a for a in answers if a != (alone, LONG)]
    assert not wrong, f"{len(wrong)} of {len(answers)} aggressor answers differ from the request alone"
    return solo, loaded


def test_limits_hold_on_vllm(worker: Worker) -> None:
    w = worker
    w.ads.patch_spec("v0", {"limits": {"maxConcurrentRequests": 1, "maxOutputTokens": 900}})
    stream = w.client().completions.create(
        model="v0", prompt=PROMPT, max_tokens=900, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))

    def refused() -> openai.APIStatusError | None:
        try:
            complete(w.client(), "v0", 2)
        except openai.APIStatusError as e:
            return e
        return None

    try:
        e = fleet.wait_for(refused, 15, "a 429")
        assert e.status_code == 429 and e.response.json()["error"]["type"] == "RateLimited"
        assert int(e.response.headers["Retry-After"]) >= 1
    finally:
        stream.close()
    fleet.wait_for(lambda: refused() is None, 30, "traffic again")
    w.ads.patch_spec("v0", {"limits": None})


def test_fair_share_between_adapters_on_vllm(worker: Worker) -> None:
    before = preemptions(worker)
    solo, loaded = beside_flood(worker, worker.client(), "v0", worker.client(), "v1")
    # Without preemption the victim waits for one of 4 running 300-token requests to finish (~20x).
    assert loaded < BOUND * solo, f"victim TTFT {loaded:.3f} s beside the flood vs {solo:.3f} s alone"
    assert preemptions(worker) > before, "no aggressor request was preempted: the answers checked nothing"


def test_fair_share_between_keys_on_vllm(worker: Worker) -> None:
    solo, loaded = beside_flood(worker, worker.client(OTHER), "v0", worker.client(PLAIN), "v0")
    assert loaded < BOUND * solo, f"victim TTFT {loaded:.3f} s beside the flood vs {solo:.3f} s alone"


def test_batch_flood_leaves_rows_for_interactive_on_vllm(worker: Worker) -> None:
    # Batch holds at most 3 of vLLM's 4 rows: an interactive request gets the fourth at once.
    solo, loaded = beside_flood(worker, worker.client(PLAIN), "v0", worker.client(BULK), "v1")
    assert loaded < BOUND * solo, f"interactive TTFT {loaded:.3f} s beside batch vs {solo:.3f} s alone"


def test_requests_held_for_a_row_are_reported_as_demand(worker: Worker) -> None:
    # 10 requests of one adapter on 4 rows: the worker holds 6, and its LoRAWorker names the adapter.
    w = worker
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            complete(w.client(), "v1", 60)

    def waiting() -> dict[str, int]:
        (obj,) = [o for o in w.ads.workers() if o["metadata"]["name"] == w.proc.name]
        return (obj.get("status") or {}).get("waiting") or {}

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(10)]
    for t in threads:
        t.start()
    try:
        seen = fleet.wait_for(lambda: waiting().get("9201"), 120, "v1 in status.waiting", interval=0.5)
        assert seen > 0 and set(waiting()) <= {"9201"}, waiting()
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    fleet.wait_for(lambda: not waiting(), 60, "status.waiting empty again", interval=0.5)
