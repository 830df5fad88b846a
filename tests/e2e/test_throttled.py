"""End to end: an adapter's spec.limits -> 429s on a worker -> the Throttled condition and its Events.

The API server fixture, the real operator and a real worker process (built-in engine, CPU) serving a
tiny Llama. One LoRAAdapter allows one request at a time (spec.limits.maxConcurrentRequests: 1): a
held stream and three more requests get 429 RateLimited; the worker lists the ID in its LoRAWorker
status.throttledIds, the operator sets Throttled=True (OverLimit) and posts one Warning Event for the
flip, not one per 429. With no more refusals for the worker's --throttled-seconds, the condition goes
back to False (WithinLimits) with one Normal Event, and requests within the limit are served.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import openai
import pytest
from support import fleet, models
from support.procs import scaled

from loraplane.crds import conditions as cond

pytestmark = [pytest.mark.kubectl, pytest.mark.slow]

PROMPT = [5, 17, 42, 9]
# The worker's window: long enough that the three 429s below are one flip, and that its report lists
# the ID before it expires, on a loaded machine.
THROTTLED_SECONDS = scaled(5)


def test_throttled_condition_and_events_follow_the_workers_429s(
    kube: Any, namespace: str, tmp_path: Path
) -> None:
    kube.apply_crds()
    base = models.make_tiny_llama(tmp_path / "models" / fleet.BASE_MODEL, max_position_embeddings=2048)
    adapter = models.make_peft_adapter(base, tmp_path / "adapters" / "capped", r=4, alpha=8, seed=1)
    worker = fleet.WorkerProc(
        kube.kubeconfig, tmp_path, name="throttle-worker", namespace=namespace, base_dir=base,
        local_root=adapter.parent,
        extra=["--mode", "serve", "--device", "cpu", "--max-num-seqs", "4",
               "--throttled-seconds", str(THROTTLED_SECONDS)],
    )  # fmt: skip
    ads = fleet.Adapters(kube, namespace)
    with fleet.OperatorProc(kube.kubeconfig, namespace, tmp_path / "operator.log") as op, worker:

        def diagnose() -> str:
            return f"operator:\n{op.log()[-2000:]}\nworker:\n{worker.log()[-2000:]}"

        def throttled() -> dict[str, Any]:
            conds = (ads.get("capped").get("status") or {}).get("conditions") or []
            return cond.get_condition(conds, cond.THROTTLED) or {}

        def reasons() -> list[str]:
            out = kube.kubectl(
                "get", "events", "-n", namespace, "--field-selector", "involvedObject.name=capped", "-o", "json"
            ).stdout  # fmt: skip
            return [e["reason"] for e in json.loads(out)["items"]]

        obj = fleet.adapter_obj("capped", f"file://{adapter}")
        obj["spec"]["limits"] = {"maxConcurrentRequests": 1}
        ads.create(obj)
        kube.kubectl("wait", "--for=condition=Ready", "lora/capped", "-n", namespace, "--timeout=120s")
        fleet.wait_for(lambda: throttled().get("reason") == cond.WITHIN_LIMITS, 60, diagnose)
        assert throttled()["status"] == "False"
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{worker.port}/v1", api_key="unused", max_retries=0)

        def served() -> bool:
            try:
                return "capped" in {m.id for m in client.models.list().data}
            except openai.APIError:
                return False

        fleet.wait_for(served, 60, diagnose)

        def complete() -> Any:
            return client.completions.create(
                model="capped", prompt=PROMPT, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
            )

        stream = client.completions.create(
            model="capped", prompt=PROMPT, max_tokens=1500, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        next(iter(stream))  # it runs: it holds the adapter's one concurrent request
        try:
            for _ in range(3):
                with pytest.raises(openai.RateLimitError) as refused:
                    complete()
                body = refused.value.response.json()["error"]
                assert body["type"] == "RateLimited" and "maxConcurrentRequests" in body["message"], body
        finally:
            stream.close()

        fleet.wait_for(lambda: throttled().get("status") == "True", 60, diagnose)
        c = throttled()
        assert c["reason"] == cond.OVER_LIMIT and f"{namespace}/throttle-worker" in c["message"], c
        fleet.wait_for(lambda: cond.OVER_LIMIT in reasons(), 30, lambda: f"an OverLimit Event\n{diagnose()}")

        # No more refusals: the worker drops the ID after --throttled-seconds and the condition clears.
        fleet.wait_for(lambda: throttled().get("status") == "False", 60, diagnose)
        assert throttled()["reason"] == cond.WITHIN_LIMITS
        fleet.wait_for(
            lambda: cond.WITHIN_LIMITS in reasons(), 30, lambda: f"a WithinLimits Event\n{diagnose()}"
        )
        said = reasons()
        assert said.count(cond.OVER_LIMIT) == 1 and said.count(cond.WITHIN_LIMITS) == 1, (
            f"one Event per flip, not per 429: {said}"
        )
        assert complete().choices[0].finish_reason == "length", "within the limit it serves again"
    ads.close()
