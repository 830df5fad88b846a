"""Tenants against a real worker process (built-in engine, CPU): limits with 429, fair share, priorities.

One `loraplane-worker` in serve mode watches two LoRAAdapters (IDs assigned by the test, as the operator
would) and reads API keys with tenant fields from a file. The test edits ``spec.limits`` on the objects
and ``status.workers`` (what the operator aggregates) and checks what the official openai client gets:
429 RateLimited with Retry-After over each limit and 200 again after, a new limit applied without a
restart, the adapter's limit divided by its Ready workers, answers under throttling the same as alone.
Then fair share: a victim's short requests beside an aggressor's flood (another adapter, or another key
on the same adapter), and interactive requests beside a batch flood, with the victim's time to first
token as a ratio of its own solo figure measured in the same run.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from support import fleet, latency, models

pytestmark = [pytest.mark.slow]

PLAIN, ACME, BULK, OTHER = "plain-key-0001", "acme-key-00001", "bulk-key-00001", "other-key-0001"
KEYS = f"""# tenants
{PLAIN}
{ACME} tenant=acme max-concurrent-requests=1 max-output-tokens=1500
{BULK} tenant=bulk priority=batch
{OTHER} tenant=other
"""
PROMPT = [5, 17, 42, 9]


class Worker:
    def __init__(self, proc: fleet.WorkerProc, ads: fleet.Adapters) -> None:
        self.proc, self.ads = proc, ads
        self.url = f"http://127.0.0.1:{proc.port}"

    def client(self, key: str = PLAIN, **headers: str) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.url + "/v1", api_key=key, max_retries=0, default_headers=headers or None
        )

    def complete(self, model: str, key: str = PLAIN, **kw: Any) -> Any:
        body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "extra_body": {"ignore_eos": True}, **kw}
        return self.client(key).completions.create(model=model, **body)

    def hold(self, model: str, key: str = PLAIN, tokens: int = 1500) -> Iterator[Any]:
        """A stream that runs until closed (its first chunk read: it holds a row and its limits)."""
        stream = self.client(key).completions.create(
            model=model, prompt=PROMPT, max_tokens=tokens, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        next(iter(stream))
        return stream

    def limits(self, name: str, limits: dict[str, Any] | None) -> None:
        self.ads.patch_spec(name, {"limits": limits})


@pytest.fixture(scope="module")
def worker(kube: Any, adapters: dict[str, Path], tmp_path_factory: Any) -> Iterator[Worker]:
    kube.apply_crds()
    namespace = kube.create_namespace()
    tmp = tmp_path_factory.mktemp("tenants")
    # The tiny Llama the adapters were made for, with room for a stream that stays open for seconds.
    base = models.make_tiny_llama(tmp / "models" / fleet.BASE_MODEL, max_position_embeddings=2048)
    (tmp / "keys").write_text(KEYS)
    ads = fleet.Adapters(kube, namespace)
    root = adapters["a0"].parent
    for i, name in enumerate(("a0", "a1")):
        ads.create(fleet.adapter_obj(name, f"file://{adapters[name]}"))
        ads.assign(name, 9100 + i)
    proc = fleet.WorkerProc(
        kube.kubeconfig, tmp, name="tenants", namespace=namespace, base_dir=base, local_root=root,
        extra=["--mode", "serve", "--device", "cpu", "--max-num-seqs", "4", "--max-loras", "2",
               "--api-key-file", str(tmp / "keys")],
    )  # fmt: skip
    with proc:
        w = Worker(proc, ads)

        def served() -> bool:
            try:
                return {"a0", "a1"} <= {m.id for m in w.client().models.list().data}
            except openai.APIError:
                return False

        fleet.wait_for(served, 120, lambda: f"adapters served\n{proc.log()[-3000:]}")
        yield w
    ads.close()
    kube.delete_namespace(namespace)


def refused(fn: Any) -> openai.APIStatusError | None:
    try:
        fn()
    except openai.APIStatusError as e:
        return e
    return None


def wait_refused(fn: Any, status: int = 429, timeout: float = 15) -> openai.APIStatusError:
    """The watch applies an edit within moments: poll until the request gets ``status``."""
    return fleet.wait_for(
        lambda: (e := refused(fn)) is not None and e.status_code == status and e, timeout, f"a {status}"
    )


def assert_rate_limited(e: openai.APIStatusError, limit: str) -> int:
    body = e.response.json()["error"]
    assert e.status_code == 429 and body["type"] == "RateLimited" and body["code"] == "rate_limit_exceeded"
    assert limit in body["message"], body
    retry = int(e.response.headers["Retry-After"])
    assert retry >= 1
    return retry


def test_adapter_concurrency_limit_applies_live_and_per_replica(worker: Worker) -> None:
    w = worker
    w.limits("a0", {"maxConcurrentRequests": 1})
    stream = w.hold("a0")
    try:
        e = wait_refused(lambda: w.complete("a0"))
        assert_rate_limited(e, "maxConcurrentRequests")
        # Reported in the worker's LoRAWorker, for the operator's Throttled condition.
        fleet.wait_for(
            lambda: any("9100" in (o.get("status") or {}).get("throttledIds", "") for o in w.ads.workers()),
            15,
            "throttledIds in the LoRAWorker",
        )
        assert w.complete("a1").choices[0].finish_reason == "length", "another adapter is not limited"
        w.limits("a0", {"maxConcurrentRequests": 2})  # edited: applies without a restart
        fleet.wait_for(lambda: refused(lambda: w.complete("a0")) is None, 15, "the raised limit")
        # Cluster-wide: two workers have it Ready (the operator's count), so this one allows 2 / 2 = 1.
        w.ads.set_status("a0", {"workers": {"ready": 2, "failed": 0, "total": 2}})
        assert_rate_limited(wait_refused(lambda: w.complete("a0")), "maxConcurrentRequests")
    finally:
        stream.close()
    fleet.wait_for(lambda: refused(lambda: w.complete("a0")) is None, 15, "traffic again after the stream")
    w.ads.set_status("a0", {"workers": {"ready": 1, "failed": 0, "total": 1}})
    metrics = w.proc.metrics()
    key = 'loraplane_worker_throttled_requests_total{limit="maxConcurrentRequests",model="a0",tenant=""}'
    assert metrics.get(key, 0) >= 2, sorted(k for k in metrics if "throttled" in k)
    w.limits("a0", None)


def test_tokens_per_minute_throttles_and_answers_stay_right(worker: Worker) -> None:
    w = worker
    alone = w.complete("a1", max_tokens=40).choices[0].text
    w.limits("a1", {"tokensPerMinute": 1200})  # 20 tokens/s; each request reserves 4 + 40
    wait_refused(lambda: [w.complete("a1", max_tokens=40) for _ in range(40)])
    time.sleep(3)  # some of the bucket back: the burst below has some through and some refused
    results: list[Any] = []
    with ThreadPoolExecutor(12) as pool:
        for f in [
            pool.submit(refused, lambda: results.append(w.complete("a1", max_tokens=40))) for _ in range(24)
        ]:
            e = f.result()
            if e is not None:
                retry = assert_rate_limited(e, "tokensPerMinute")
                assert retry <= 3, retry  # (44 tokens at 20 tokens/s)
    assert results and len(results) < 24, len(results)
    # Nothing answered wrongly under throttling: every admitted request equals the request alone.
    assert {r.choices[0].text for r in results} == {alone}
    time.sleep(3)
    assert w.complete("a1", max_tokens=40).choices[0].text == alone, "traffic again after Retry-After"
    w.limits("a1", None)


def test_max_output_tokens_caps_a_default_and_refuses_more(worker: Worker) -> None:
    w = worker
    w.limits("a0", {"maxOutputTokens": 5})
    e = wait_refused(lambda: w.complete("a0", max_tokens=6), status=400)
    assert (
        e.response.json()["error"]["type"] == "MaxTokensAboveLimit"
        and e.response.json()["error"]["param"] == "max_tokens"
    )
    out = w.client().completions.create(
        model="a0", prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == 5 and out.choices[0].finish_reason == "length"
    w.limits("a0", None)


def test_key_limits_and_priority_header(worker: Worker) -> None:
    w = worker
    stream = w.hold("a0", key=ACME)
    try:
        assert_rate_limited(refused(lambda: w.complete("a0", key=ACME)), "maxConcurrentRequests")
        assert w.complete("a0", key=PLAIN).choices, "another key is not limited"
    finally:
        stream.close()
    fleet.wait_for(lambda: refused(lambda: w.complete("a0", key=ACME)) is None, 15, "acme again")
    e = refused(lambda: w.complete("a0", key=ACME, max_tokens=1501))
    assert e is not None and e.status_code == 400 and "acme" in e.response.json()["error"]["message"]
    r = httpx.post(
        w.url + "/v1/completions",
        json={"model": "a0", "prompt": PROMPT, "max_tokens": 2},
        headers={"Authorization": f"Bearer {PLAIN}", "X-Loraplane-Priority": "urgent"},
        timeout=30,
    )
    assert r.status_code == 400 and r.json()["error"]["type"] == "InvalidPriority", r.text
    assert (
        w.proc.metric(
            'loraplane_worker_throttled_requests_total{limit="maxConcurrentRequests",model="a0",tenant="acme"}'
        )
        >= 1
    )


def ttft(client: openai.OpenAI, model: str) -> float:
    return latency.ttft(client, model, PROMPT)


def flood(client: openai.OpenAI, model: str, stop: threading.Event, tokens: int = 100) -> None:
    while not stop.is_set():
        try:
            client.completions.create(
                model=model, prompt=PROMPT, max_tokens=tokens, temperature=0, extra_body={"ignore_eos": True}
            )
        except openai.APIError:
            return


def victim_ratio(
    w: Worker, victim: openai.OpenAI, model: str, aggressor: openai.OpenAI, aggressor_model: str
) -> float:
    """The victim's median TTFT beside 8 aggressor streams (4 rows), over its solo median."""
    solo = statistics.median(ttft(victim, model) for _ in range(8))
    stop = threading.Event()
    threads = [
        threading.Thread(target=flood, args=(aggressor, aggressor_model, stop), daemon=True) for _ in range(8)
    ]
    for t in threads:
        t.start()
    time.sleep(1.0)  # the flood fills the rows and queues
    try:
        loaded = statistics.median(ttft(victim, model) for _ in range(8))
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    return loaded / solo


# Under FCFS the victim waits for the queued flood (8 requests of 100 tokens on 4 rows): about one
# aggressor request's length, tens of times its solo TTFT (bench_fairness.py prints both). Fair share
# admits it within a step (parking an aggressor request, which keeps its KV); what is left is the CPU the
# flood's HTTP traffic and larger steps take on a shared 2-core machine.
BOUND = 10.0


def test_fair_share_between_adapters(worker: Worker) -> None:
    ratio = victim_ratio(worker, worker.client(), "a0", worker.client(), "a1")
    assert ratio <= BOUND, f"victim TTFT {ratio:.1f}x solo beside another adapter's flood"


def test_fair_share_between_keys_on_one_adapter(worker: Worker) -> None:
    ratio = victim_ratio(worker, worker.client(OTHER), "a0", worker.client(PLAIN), "a0")
    assert ratio <= BOUND, f"victim TTFT {ratio:.1f}x solo beside another key's flood on the same adapter"


def test_batch_flood_does_not_delay_interactive(worker: Worker) -> None:
    # The batch key floods the same adapter and tenant-less interactive requests come in: the bound is
    # one step (rows kept free for interactive, and preemption of batch when they are used).
    ratio = victim_ratio(worker, worker.client(PLAIN), "a0", worker.client(BULK), "a0")
    assert ratio <= BOUND, f"interactive TTFT {ratio:.1f}x solo beside a batch flood"
