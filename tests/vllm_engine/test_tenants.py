"""Tenants on a vLLM worker process: limits with 429, fair share between adapters and keys, priorities.

One worker with ``--engine vllm`` (one engine for the module, vLLM running at most 4 sequences) serves
two adapters, with IDs assigned by the test as the operator would, and API keys with tenant fields.
The limits are the HTTP side's (engine-neutral): one check here that they hold on vLLM too. Fair share
is the worker's short-queue release (vllm/engine.py): a victim's short request beside an aggressor's
flood waits for the next running request to finish, never for the aggressor's queue, which under FCFS
is more than one whole aggressor request; answers are checked equal to the request alone. The requests
held for a row are the demand the LoRAWorker reports in ``status.waiting``.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from support import fleet, latency, models
from vllm_engine.test_worker import BASE, PROMPT, SHAPE, VLLM_ARGS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PLAIN, OTHER, BULK = "plain-key-0001", "other-key-0001", "bulk-key-00001"
KEYS = f"{PLAIN}\n{OTHER} tenant=other\n{BULK} tenant=bulk priority=batch\n"
LONG = 60  # the aggressor's output tokens


class Worker:
    def __init__(self, proc: fleet.WorkerProc, ads: fleet.Adapters) -> None:
        self.proc, self.ads = proc, ads
        self.url = f"http://127.0.0.1:{proc.port}/v1"

    def client(self, key: str = PLAIN) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=120)


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


def beside_flood(
    w: Worker, victim: openai.OpenAI, model: str, aggressor: openai.OpenAI, agg_model: str
) -> tuple[float, float]:
    """(the victim's median TTFT, the aggressor's median request time) with 8 aggressor requests on 4 rows."""
    alone = complete(aggressor, agg_model, LONG)
    stop = threading.Event()
    took: list[float] = []
    wrong: list[str] = []

    def flood() -> None:
        while not stop.is_set():
            start = time.monotonic()
            text = complete(aggressor, agg_model, LONG)
            took.append(time.monotonic() - start)
            if text != alone:
                wrong.append(text)

    threads = [threading.Thread(target=flood, daemon=True) for _ in range(8)]
    for t in threads:
        t.start()
    fleet.wait_for(lambda: len(took) >= 4, 120, "the flood running")
    try:
        victim_ttft = statistics.median(ttft(victim, model) for _ in range(6))
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not wrong, "an aggressor request was answered differently under load"
    return victim_ttft, statistics.median(took)


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
    victim, request = beside_flood(worker, worker.client(), "v0", worker.client(), "v1")
    # FCFS: behind 4 queued aggressor requests, more than one whole aggressor request.
    assert victim < 0.6 * request, f"victim TTFT {victim:.2f} s vs aggressor request {request:.2f} s"


def test_fair_share_between_keys_on_vllm(worker: Worker) -> None:
    victim, request = beside_flood(worker, worker.client(OTHER), "v0", worker.client(PLAIN), "v0")
    assert victim < 0.6 * request, f"victim TTFT {victim:.2f} s vs aggressor request {request:.2f} s"


def test_batch_flood_leaves_rows_for_interactive_on_vllm(worker: Worker) -> None:
    # Batch holds at most 3 of vLLM's 4 rows: an interactive request gets the fourth at once.
    victim, request = beside_flood(worker, worker.client(PLAIN), "v0", worker.client(BULK), "v1")
    assert victim < 0.25 * request, f"interactive TTFT {victim:.2f} s vs batch request {request:.2f} s"


def test_requests_held_for_a_row_are_reported_as_demand(worker: Worker) -> None:
    # 10 requests of one adapter on 4 rows: the worker holds 6, and its LoRAWorker names the adapter.
    w = worker
    stop = threading.Event()

    def flood() -> None:
        while not stop.is_set():
            complete(w.client(), "v1", LONG)

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
