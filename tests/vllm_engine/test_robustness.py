"""A vLLM pool as safe as a built-in pool: poisoned adapters and hostile but valid requests (issue 18).

The session's worker (conftest.vllm_fleet: one vLLM engine) serves the module, last in the session:
- an adapter whose weights are all 3e19 is refused by validation (UnrepresentableWeights);
- an adapter just under that bound, whose forward still overflows (NaN), is served next to good
  adapters: its requests get 400 NonFiniteOutput, it is quarantined (Failed, in the report, the
  adapter's status and an Event), and the good adapters and the base model answer PEFT's greedy
  output before, during and after it (vLLM's CPU backend used to hand its NaN KV blocks to everyone);
- client errors (logit_bias token IDs, response_format, schema bounds vLLM refuses inside generate,
  the schema-size and logprob caps) get 400 naming the field, never 500;
- /health answers within 1 s while 4 streams of n=16, logprobs=20 run;
- last, SIGTERM with --drain-seconds 3: every stream cut by the shutdown ends with a ShuttingDown event.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from support import fleet, models
from vllm_engine.test_worker import (
    BASE,
    PROMPT,
    Served,
    decoder,
    manifest,
    peft_greedy,
)

pytestmark = [pytest.mark.kubectl, pytest.mark.slow, pytest.mark.timeout(900)]

LONG = list(range(3, 43))  # 40 tokens: the prompt that used to poison the KV cache
MAX_TOKENS = 10
# alpha 8 / r 4 = scaling 2; hidden 128, intermediate 256. Every lora_A value 1e8 and lora_B values
# such that scaling x (fan_in x 1e8) x (4 x b) = 1e19 for inputs of magnitude 1: just under the float32
# bound (2**64 = 1.8e19), so validation passes it. Real hidden states are larger than 1 and gate x up
# multiplies two such updates, so down_proj's input overflows float32 on most tokens: NaN logits.
SNEAKY_B = {
    "gate_proj": 1e19 / (2 * 128e8 * 4),
    "up_proj": 1e19 / (2 * 128e8 * 4),
    "down_proj": 1e19 / (2 * 256e8 * 4),
}


def _fill(adapter: Path, value: Any) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    path = adapter / "adapter_model.safetensors"
    tensors = load_file(str(path))
    save_file({k: torch.full_like(t, value(k)) for k, t in tensors.items()}, str(path))
    return adapter


@pytest.fixture(scope="module")
def served(vllm_fleet: Served) -> Served:
    """The session's fleet (conftest.vllm_fleet) with the poisoned adapters; this module runs last (its
    last test stops the worker), so alpha and beta serve whatever test_worker left them at."""
    base, adapters = vllm_fleet.base, vllm_fleet.paths["alpha"].parent
    poison = _fill(models.make_peft_adapter(base, adapters / "poison", r=4, alpha=8, seed=7), lambda k: 3e19)
    mlp = ["gate_proj", "up_proj", "down_proj"]
    sneaky = models.make_peft_adapter(base, adapters / "sneaky", r=4, alpha=8, seed=8, target_modules=mlp)
    s = vllm_fleet.adding({"poison": poison})  # sneaky is applied by its test
    s.paths["sneaky"] = _fill(sneaky, lambda k: 1e8 if "lora_A" in k else SNEAKY_B[k.split(".")[-3]])
    for name in ("alpha", "beta"):
        s.paths[name] = Path(s.ads.get(name)["spec"]["path"].removeprefix("file://"))
    s.wait_ready(("alpha", "beta"), 120)
    return s


def _phase(ads: fleet.Adapters, name: str) -> str | None:
    return (ads.get(name).get("status") or {}).get("phase")


def _greedy(s: Served, model: str, prompt: list[int]) -> str:
    out = s.client.completions.create(
        model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    return out.choices[0].text


def _post(s: Served, body: dict[str, Any], path: str = "/v1/completions") -> httpx.Response:
    return httpx.post(s.url + path, json=body, timeout=120)


def test_an_adapter_that_overflows_every_dtype_is_refused_by_validation(served: Served) -> None:
    st = fleet.wait_for(
        lambda: _phase(served.ads, "poison") == "Failed" and served.ads.get("poison")["status"],
        60,
        "poison Failed",
    )
    report = fleet.report(served.ads, served.worker.name, served.namespace)
    assert report[st["id"]]["reason"] == "UnrepresentableWeights", report[st["id"]]
    assert "overflows float32" in st["message"], st
    r = _post(served, {"model": "poison", "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["type"] == "UnrepresentableWeights", r.text


def test_a_poisoned_adapter_fails_alone_and_is_quarantined(served: Served) -> None:
    """The adapter passes validation (just under the bound) yet its forward overflows to NaN. Good
    adapters and the base model answer PEFT's greedy output before, during and after it."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    s = served
    decode = decoder(s.base)
    with models.quiet_peft():
        model = PeftModel.from_pretrained(
            AutoModelForCausalLM.from_pretrained(str(s.base)), str(s.paths["sneaky"])
        )
    with torch.no_grad():
        assert model(torch.tensor([LONG])).logits.isnan().any(), "the adapter overflows in PEFT too"
    want = {
        (name, tuple(prompt)): decode(
            peft_greedy(s.base, None if name == BASE else s.paths[name], MAX_TOKENS, prompt)
        )
        for name in (BASE, "alpha", "beta")
        for prompt in (PROMPT, LONG)
    }

    def check(when: str) -> None:
        got = {key: _greedy(s, key[0], list(key[1])) for key in want}
        wrong = {k: v for k, v in got.items() if v != want[k]}
        assert not wrong, f"{when}: outputs differ from PEFT's: {wrong}"

    check("before")
    s.kube.kubectl(
        "apply", "-f", "-", input=yaml.safe_dump(manifest(s.namespace, "sneaky", s.paths["sneaky"]))
    )
    fleet.wait_for(lambda: _phase(s.ads, "sneaky") == "Ready", 120, lambda: s.worker.log()[-3000:])
    sneaky_id = s.ads.get("sneaky")["status"]["id"]

    # During: the poisoned requests run in the same batches as good ones.
    poisoned: list[httpx.Response] = []
    good: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    barrier = threading.Barrier(3 + len(want))

    def bad() -> None:
        barrier.wait(30)
        poisoned.append(
            _post(s, {"model": "sneaky", "prompt": LONG, "max_tokens": MAX_TOKENS, "temperature": 0})
        )

    def fine(key: tuple[str, tuple[int, ...]]) -> None:
        barrier.wait(30)
        good.setdefault(key, []).append(_greedy(s, key[0], list(key[1])))

    threads = [threading.Thread(target=bad) for _ in range(3)] + [
        threading.Thread(target=fine, args=(k,)) for k in want
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert len(poisoned) == 3 and all(r.status_code == 400 for r in poisoned), [r.text for r in poisoned]
    assert {r.json()["error"]["type"] for r in poisoned} == {"NonFiniteOutput"}, [r.text for r in poisoned]
    wrong = {k: v for k, v in good.items() if v != [want[k]]}
    assert not wrong, f"during: outputs differ from PEFT's: {wrong}"

    # Quarantined on this worker: Failed with the reason, in the report, the adapter's status and an Event.
    st = fleet.wait_for(
        lambda: _phase(s.ads, "sneaky") == "Failed" and s.ads.get("sneaky")["status"], 60, "Failed"
    )
    assert "quarantined" in st["message"] and "NaN" in st["message"], st
    assert fleet.report(s.ads, s.worker.name, s.namespace)[sneaky_id]["reason"] == "NonFiniteOutput"

    def sneaky_events() -> str:
        args = ("get", "events", "-n", s.namespace, "--field-selector", "involvedObject.name=sneaky")
        return s.kube.kubectl(*args).stdout

    events = fleet.wait_for(lambda: "NonFiniteOutput" in (e := sneaky_events()) and e, 60, "the Event")
    assert "Warning" in events, events
    r = _post(s, {"model": "sneaky", "prompt": PROMPT, "max_tokens": 2})
    assert r.status_code == 400 and r.json()["error"]["type"] == "NonFiniteOutput", r.text
    fleet.wait_for(
        lambda: sneaky_id not in s.engine()["adapterIds"], 60, "vLLM drops the quarantined adapter"
    )

    # After: the blocks the NaN requests held are handed out again; every output is still PEFT's.
    for _ in range(3):
        check("after")


def test_client_errors_get_400_naming_the_field(served: Served) -> None:
    base = {"model": "alpha", "prompt": PROMPT, "max_tokens": 4}
    enum = {"type": "string", "enum": [f"value-{i}" for i in range(40_000)]}
    cases = [
        ({"logit_bias": {"-1": 5}}, "logit_bias"),
        ({"logit_bias": {"100000": 5}}, "logit_bias"),
        ({"logit_bias": {"12345678901234567890123": 5}}, "logit_bias"),
        ({"logit_bias": {"seven": 5}}, "logit_bias"),
        ({"response_format": {"type": "nonsense"}}, "response_format"),
        (
            {"response_format": _schema({"type": "integer", "minimum": -1e30, "maximum": 1e30})},
            "response_format",
        ),
        ({"response_format": _schema(enum)}, "response_format"),
        ({"n": 16, "logprobs": 20, "max_tokens": 900}, "logprobs"),
    ]
    logged = len(served.worker.log())
    for extra, field in cases:
        r = _post(served, base | extra)
        assert r.status_code == 400, (extra if len(str(extra)) < 200 else field, r.status_code, r.text[:500])
        error = r.json()["error"]
        assert field in (error.get("param") or "") + error["message"], (field, error)
    log = served.worker.log()[logged:]
    assert "Traceback" not in log, log[-3000:]
    assert _greedy(served, "alpha", PROMPT), "the worker serves on"


def _events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """SSE data events; [DONE] as {"done": True}. Split on newlines only, as SSE does (httpx's
    iter_lines also splits on U+0085 and U+2028, which a token's text may hold)."""
    buffer = b""
    for data in response.iter_bytes():
        buffer += data
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"data: "):
                yield {"done": True} if line == b"data: [DONE]" else json.loads(line[6:])


def _schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def test_health_answers_within_a_second_under_a_flood_of_logprobs(served: Served) -> None:
    """4 streams of n=16, logprobs=20 (max_tokens kept within --max-logprob-entries) while /health is
    polled: the event loop stays responsive (it used to stop answering for 30 s and more)."""
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 150, "n": 16, "logprobs": 20,
            "temperature": 1.0, "stream": True, "ignore_eos": True}  # fmt: skip
    chunks: list[int] = []

    def stream() -> None:
        finished: set[int] = set()
        with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=300) as r:
            assert r.status_code == 200, r.read()
            for event in _events(r):
                for c in event.get("choices", []):
                    # top_logprobs maps token text to logprob: alternatives with the same text merge
                    assert c["logprobs"] is None or all(c["logprobs"]["top_logprobs"])
                    if c["finish_reason"] == "length":
                        finished.add(c["index"])
        chunks.append(len(finished))

    def probe() -> float:
        """/health's answer time as curl measures it: a process of its own, so the stream readers here
        (Python, parsing megabytes of logprobs) cannot delay it through this process's GIL."""
        args = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{time_total}", "--max-time", "60"]
        code, seconds = subprocess.run(
            [*args, served.url + "/health"], capture_output=True, text=True
        ).stdout.split()
        assert code == "200", code
        return float(seconds)

    idle = max(probe() for _ in range(5))  # what this machine's load alone costs a probe
    threads = [threading.Thread(target=stream) for _ in range(4)]
    for t in threads:
        t.start()
    latencies = []
    deadline = time.monotonic() + 240
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        latencies.append(probe())
        time.sleep(0.2)
    for t in threads:
        t.join(60)
    assert chunks == [16] * 4, chunks  # every choice of every stream ran to its length
    # Within 1 s (beyond what an idle worker takes on this machine) for 9 probes in 10, and never near
    # the chart's liveness timeout (5 s); before, the loop stopped answering for 30 s and more.
    ranked = sorted(latencies)
    assert len(ranked) > 5 and ranked[int(0.9 * len(ranked))] < 1.0 + idle, (idle, ranked[-5:])
    assert ranked[-1] < 5.0, (idle, ranked[-5:])


def test_sigterm_ends_every_cut_stream_with_shutting_down(served: Served) -> None:
    """Last in the module: the worker stops. With --drain-seconds 3, streams longer than that are cut by
    the shutdown, and each says so (an error event, then [DONE]) instead of ending silently."""
    body = {"model": "alpha", "prompt": PROMPT, "max_tokens": 900, "temperature": 0, "stream": True,
            "ignore_eos": True}  # fmt: skip
    events: dict[int, list[dict[str, Any]]] = {i: [] for i in range(4)}
    started = [threading.Event() for _ in range(4)]

    def stream(i: int) -> None:
        with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=120) as r:
            for event in _events(r):
                events[i].append(event)
                started[i].set()

    threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    assert all(e.wait(60) for e in started), "the streams did not start"
    served.worker.proc.send_signal(15)
    for t in threads:
        t.join(120)
    assert served.worker.proc.wait(60) == 0, served.worker.log()[-3000:]
    for i, got in events.items():
        assert got[-1] == {"done": True}, (i, got[-3:])
        last = got[-2]
        assert last.get("error", {}).get("type") == "ShuttingDown", (i, len(got), got[-3:])
    assert "drain deadline reached with 4 requests still in flight" in served.worker.log()
