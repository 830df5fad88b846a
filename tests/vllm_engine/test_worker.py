"""End to end with ``--engine vllm``: kubectl apply -> operator IDs -> worker validates and loads each
adapter into vLLM under its cluster ID -> Ready -> completions through the official openai client.

The session's worker (conftest.vllm_fleet: one vLLM engine, ~1 min to start on 2 cores, shared with
test_openai and test_robustness) serves the module, in order:
outputs equal PEFT's greedy output and the built-in engine's token for token; base and adapter rows
batched together equal each alone (the CPU LoRA bug that plugin.py fixes); adapters loraplane
refuses and adapters vLLM refuses fail alone with their reasons; n > 1, logprobs, structured output
and streaming usage; a version swap under streaming load with vLLM's LoRA ID set compared with the
IDs loraplane serves as Ready at every sample; vLLM's own metric series on the worker's /metrics; a
same-name reload that never reuses the old version's prefix-cached KV.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from support import fleet, models
from support.swap import swap_under_streaming

pytestmark = [pytest.mark.kubectl, pytest.mark.slow, pytest.mark.timeout(900)]

BASE = fleet.BASE_MODEL
PROMPT = [5, 17, 42, 9]  # token IDs: no tokenizer round trip between us and the reference
SHAPE = dict(
    hidden_size=128,
    num_attention_heads=2,
    num_key_value_heads=2,
    intermediate_size=256,
    max_position_embeddings=1024,  # room for a prompt of several 128-token KV blocks (vLLM's CPU size)
)
GOOD = {  # vLLM's CPU attention needs head_dim 64: hidden 128, 2 heads
    "alpha": dict(r=4, alpha=8, seed=1, init_scale=0.3),
    "beta": dict(r=8, alpha=16, seed=2, init_scale=0.3, use_rslora=True),
    "gamma": dict(r=16, alpha=16, seed=3, init_scale=0.3, target_modules=["q_proj", "v_proj", "down_proj"]),
}
MAX_TOKENS = 10
VLLM_ARGS = (
    "--kv-cache-memory-bytes=64M --enforce-eager "
    # Compact JSON: a tiny random model would otherwise fill max_tokens with legal whitespace.
    """--structured-outputs-config='{"backend": "xgrammar", "disable_any_whitespace": true}'"""
)


class Served:
    """The running fleet: kube, the adapters client, the worker, and an openai client."""

    def __init__(self, kube: Any, namespace: str, worker: Any, ads: Any, base: Path, paths: dict[str, Path]):
        from openai import OpenAI

        self.kube, self.namespace, self.worker, self.ads = kube, namespace, worker, ads
        self.base, self.paths = base, paths
        self.url = f"http://127.0.0.1:{worker.port}"
        self.client = OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def wait_ready(self, names: Iterable[str], timeout: float) -> None:
        fleet.wait_for(
            lambda: all((self.ads.get(n).get("status") or {}).get("phase") == "Ready" for n in names),
            timeout,
            lambda: self.worker.log()[-4000:],
        )

    def adding(self, paths: dict[str, Path]) -> Served:
        """This fleet with these adapters applied too (not waited for), as a Served of its own."""
        docs = [manifest(self.namespace, n, p) for n, p in paths.items()]
        self.kube.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
        return Served(self.kube, self.namespace, self.worker, self.ads, self.base, self.paths | paths)

    def ready_ids(self) -> set[int]:
        """The IDs of the adapters in this namespace that are Ready."""
        body = self.ads.api.list_namespaced_custom_object(
            fleet.GROUP, fleet.VERSION, self.namespace, "loraadapters"
        )
        statuses = [o.get("status") or {} for o in body.get("items") or []]
        return {st["id"] for st in statuses if st.get("phase") == "Ready"}

    def engine(self) -> dict[str, Any]:
        with urllib.request.urlopen(self.url + "/engine", timeout=30) as r:
            return json.loads(r.read())

    def text(self, model: str, max_tokens: int = MAX_TOKENS) -> str:
        out = self.client.completions.create(
            model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0, extra_body={"ignore_eos": True}
        )
        return out.choices[0].text


def _with_config(adapter: Path, **fields: Any) -> Path:
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(cfg | fields))
    return adapter


@pytest.fixture(scope="module")
def served(vllm_fleet: Served) -> Served:
    """The session's fleet (conftest.vllm_fleet: alpha, beta and gamma Ready) with adapters that fail."""
    base = vllm_fleet.base
    root = vllm_fleet.paths["alpha"].parent
    # loraplane's validator refuses these (rank above --max-lora-rank; a PiSSA init, which changes the
    # base weights) before vLLM sees them ...
    paths = {"toobig": models.make_peft_adapter(base, root / "toobig", r=32, alpha=32, seed=4)}
    pissa = models.make_peft_adapter(base, root / "pissa", r=4, alpha=8, seed=5)
    paths["pissa"] = _with_config(pissa, init_lora_weights="pissa")
    # ... and vLLM refuses this one, which loraplane's checks pass: the engine's own refusal path.
    bdlora = models.make_peft_adapter(base, root / "bdlora", r=4, alpha=8, seed=6)
    paths["bdlora"] = _with_config(bdlora, use_bdlora=True)
    return vllm_fleet.adding(paths)


def manifest(namespace: str, name: str, path: Path) -> dict[str, Any]:
    return {
        "apiVersion": "loraplane.io/v1alpha1",
        "kind": "LoRAAdapter",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"baseModel": BASE, "path": f"file://{path}"},
    }


def peft_greedy(base: Path, adapter: Path | None, max_tokens: int, prompt: list[int] = PROMPT) -> list[int]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    if adapter is not None:
        with models.quiet_peft():
            model = PeftModel.from_pretrained(model, str(adapter))
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def builtin_greedy(base: Path, adapters: dict[str, Path], max_tokens: int) -> dict[str | None, list[int]]:
    """The built-in engine's greedy tokens on the same checkpoint and adapters (its own process)."""
    from loraplane.worker.builtin.service import Engine, EngineSettings
    from loraplane.worker.inference.engines import LoraSpec
    from loraplane.worker.inference.sampling import SamplingParams

    engine = Engine.start(base, EngineSettings(device="cpu", dtype="float32", max_model_len=256))
    try:
        out: dict[str | None, list[int]] = {}
        for i, name in enumerate([None, *adapters]):
            done = threading.Event()
            got: list[int] = []

            def on_output(o: Any, got: list[int] = got, done: threading.Event = done) -> None:
                got.extend(o.token_ids)
                if o.finish_reason is not None:
                    done.set()

            adapter = None if name is None else LoraSpec(id=100 + i, name=name, path=adapters[name])
            if adapter is not None:
                asyncio.run(engine.add_adapter(adapter))
            engine.submit(
                request_id=f"ref-{i}",
                model=name or BASE,
                adapter=adapter,
                prompt_ids=PROMPT,
                params=SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                on_output=on_output,
            )
            assert done.wait(60)
            out[name] = got
        return out
    finally:
        engine.stop()


def decoder(base: Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    # As vLLM detokenizes, which holds back an incomplete UTF-8 sequence at the end of a text (the tiny
    # byte-level tokenizer often ends on one); every complete character must match.
    return lambda ids: tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def test_ids_are_ours_and_bad_adapters_fail_alone(served: Served) -> None:
    ids = served.ads.ids()
    listed = {m.id: (m.model_extra or {}).get("loraplane") or {} for m in served.client.models.list().data}
    assert {n: listed[n].get("id") for n in GOOD} == {n: ids[n] for n in GOOD}, listed
    assert not {"toobig", "pissa", "bdlora"} & set(listed)
    state = served.engine()
    assert state["kind"] == "vllm"
    assert set(state["adapterIds"]) == served.ready_ids(), "vLLM holds exactly the Ready IDs: warm"
    assert {ids[n] for n in GOOD} <= served.ready_ids()

    def failed(name: str) -> dict[str, Any]:
        st = served.ads.get(name).get("status") or {}
        return st if st.get("phase") == "Failed" else {}

    big = fleet.wait_for(lambda: failed("toobig"), 60, "toobig Failed")
    assert "maxLoraRank" in big["message"], big
    pissa = fleet.wait_for(lambda: failed("pissa"), 60, "pissa Failed")
    assert "init_lora_weights" in pissa["message"] and "path_initial_model" in pissa["message"], pissa
    bdlora = fleet.wait_for(lambda: failed("bdlora"), 60, "bdlora Failed")
    assert "vLLM" in bdlora["message"] and "BD-LoRA" in bdlora["message"], bdlora
    report = fleet.report(served.ads, "vllm-worker", served.namespace)
    assert report[ids["pissa"]]["reason"] == "UnsupportedFeature", report[ids["pissa"]]
    assert report[ids["bdlora"]]["reason"] == "EngineRefused", report[ids["bdlora"]]
    r = served.client.with_options(max_retries=0)
    from openai import BadRequestError

    for name, fragment in (("pissa", "init_lora_weights"), ("bdlora", "BD-LoRA")):
        with pytest.raises(BadRequestError) as err:
            r.completions.create(model=name, prompt=PROMPT, max_tokens=2)
        assert fragment in str(err.value)
    assert served.text("alpha") == served.text("alpha"), "the good ones serve on"


def test_outputs_match_peft_and_builtin(served: Served) -> None:
    decode = decoder(served.base)
    good = {n: served.paths[n] for n in GOOD}
    builtin = builtin_greedy(served.base, good, MAX_TOKENS)
    for name in [None, *GOOD]:
        peft = peft_greedy(served.base, None if name is None else good[name], MAX_TOKENS)
        assert builtin[name] == peft, f"{name}: the built-in engine differs from PEFT"
        got = served.text(name or BASE)
        assert got == decode(peft), f"{name or BASE}: vLLM's output differs from PEFT's greedy output"


def test_base_and_adapter_rows_in_one_batch_equal_each_alone(served: Served) -> None:
    names = [BASE, *GOOD]
    alone = {n: served.text(n, 24) for n in names}
    assert len(set(alone.values())) == len(alone), "each model's output differs visibly"
    results: dict[tuple[str, int], str] = {}
    barrier = threading.Barrier(len(names) * 2)

    def one(name: str, k: int) -> None:
        barrier.wait(30)
        results[(name, k)] = served.text(name, 24)

    threads = [threading.Thread(target=one, args=(n, k)) for n in names for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    wrong = {key: text for key, text in results.items() if text != alone[key[0]]}
    assert len(results) == len(threads) and not wrong, f"batched rows differ from alone: {wrong}"


def test_openai_features_through_the_official_client(served: Served) -> None:
    c = served.client
    many = c.chat.completions.create(
        model="alpha",
        messages=[{"role": "user", "content": "hi"}],
        n=3,
        max_tokens=6,
        temperature=1.0,
        seed=7,
        logprobs=True,
        top_logprobs=2,
    )
    assert [ch.index for ch in many.choices] == [0, 1, 2]
    assert many.usage.completion_tokens == sum(len(ch.logprobs.content) for ch in many.choices)
    assert all(len(t.top_logprobs) == 2 for ch in many.choices for t in ch.logprobs.content)

    schema = {
        "type": "object",
        "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}, "score": {"type": "boolean"}},
        "required": ["answer", "score"],
        "additionalProperties": False,
    }
    out = c.chat.completions.create(
        model="beta",
        messages=[{"role": "user", "content": "decide"}],
        max_tokens=40,
        temperature=1.0,
        seed=3,
        response_format={"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}},
    )
    import jsonschema

    value = json.loads(out.choices[0].message.content)
    jsonschema.validate(value, schema)
    free = c.completions.create(
        model=BASE,
        prompt="x",
        max_tokens=40,
        temperature=0,
        extra_body={"response_format": {"type": "json_object"}},  # vLLM's extension on completions
    )
    # Any JSON object: a random tiny model may open a string and not close it within max_tokens; what
    # it wrote is then a truncated object, and a finished one parses.
    text = free.choices[0].text
    assert text.startswith("{"), text
    if free.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)

    stream = c.completions.create(
        model="gamma",
        prompt=PROMPT,
        max_tokens=5,
        n=2,
        stream=True,
        stream_options={"include_usage": True},
        presence_penalty=0.5,
        frequency_penalty=0.2,
        extra_body={"ignore_eos": True, "repetition_penalty": 1.1, "min_p": 0.05},
        logit_bias={"7": 5},
    )
    texts = {0: "", 1: ""}
    usage = None
    for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] += ch.text
        usage = chunk.usage or usage
    assert usage is not None and usage.completion_tokens == 10 and usage.prompt_tokens == len(PROMPT)
    assert all(texts.values())


def test_swap_under_streaming_load_keeps_engine_ids_equal_to_ready(served: Served) -> None:
    s = served
    decode = decoder(s.base)
    ids = s.ads.ids()
    old_id = ids["alpha"]
    long_tokens = 60
    swap = swap_under_streaming(
        s.client, s.kube, s.ads, name="alpha", new_path=s.paths["beta"], prompt=PROMPT,
        max_tokens=long_tokens, wait_s=120, sample=s.engine, diagnose=lambda: s.worker.log()[-3000:],
    )  # fmt: skip
    new_id, samples = swap.new_id, swap.samples
    assert new_id > max(ids.values())
    swap.check(
        decode(peft_greedy(s.base, s.paths["alpha"], long_tokens)),
        decode(peft_greedy(s.base, s.paths["beta"], long_tokens)),
    )

    # At every sample: each ID Ready throughout the sample is held by vLLM (warm), and vLLM holds
    # nothing but Ready IDs, IDs being loaded before Ready, and retired IDs still draining.
    assert len(samples) > 10
    for x in samples:
        held = set(x["adapterIds"])
        stable = set(x["readyIdsBefore"]) & set(x["readyIds"])
        allowed = set(x["readyIds"]) | set(x["readyIdsBefore"]) | set(x["drainingIds"]) | set(x["pendingIds"])
        assert stable <= held <= allowed, x
    assert any(old_id in x["adapterIds"] and new_id in x["adapterIds"] for x in samples), (
        "both versions were held while the old one drained"
    )
    # Quiescent: exactly the Ready IDs, the old one removed from vLLM once drained.
    final = fleet.wait_for(
        lambda: (e := s.engine()) and set(e["adapterIds"]) == set(e["readyIds"]) and e, 60, "drained"
    )
    assert old_id not in final["adapterIds"] and new_id in final["adapterIds"]


def test_vllm_metrics_beside_loraplane_metrics(served: Served) -> None:
    served.text("alpha")
    names = {key.split("{")[0] for key in served.worker.metrics()}
    for series in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
        "vllm:lora_requests_info",
        "vllm:generation_tokens_total",
        "loraplane_worker_requests_total",
        "loraplane_worker_prefetch_bytes_total",
    ):
        assert series in names, (series, sorted(names))


def loaded(served: Served) -> tuple[dict[str, str], dict[str, float]]:
    """vLLM's residency series on the worker's /metrics: served name -> level, and the three counts."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(served.url + "/metrics", timeout=10) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    levels = {}
    for sample in families["vllm:lora_adapter_loaded"].samples:
        assert (sample.labels["model_name"], sample.labels["engine"], sample.value) == (BASE, "0", 1.0)
        assert sample.labels["pinned"] == "false", sample
        levels[sample.labels["adapter_name"]] = sample.labels["level"]
    counts = {
        n: families[f"vllm:{n}"].samples[0].value
        for n in ("num_gpu_loaded_lora_adapters", "num_cpu_loaded_lora_adapters", "max_gpu_lora_adapters")
    }
    return levels, counts


def test_residency_series_list_exactly_what_vllm_holds(served: Served) -> None:
    """vLLM #54830's series, read from vLLM's own model runner: every Ready adapter is in vLLM's CPU
    cache (add_lora loads it there), the ones that served last hold the GPU slots (--max-loras 2), a
    deleted adapter's series goes away, and a re-added one comes back in a slot (add_lora activates)."""
    s = served
    ready = {m.id for m in s.client.models.list().data} - {BASE}
    assert ready >= set(GOOD), ready
    for name in sorted(ready):  # each one served once: the last two hold the slots
        s.text(name, max_tokens=2)
    last_two = sorted(ready)[-2:]

    def converged(want: dict[str, str]) -> Any:
        got = loaded(s)
        return got if got[0] == want else None

    want = {n: "gpu" if n in last_two else "cpu" for n in ready}
    levels, counts = fleet.wait_for(lambda: converged(want), 30, lambda: f"{loaded(s)} != {want}")
    assert counts == {
        "num_gpu_loaded_lora_adapters": 2.0,
        "num_cpu_loaded_lora_adapters": float(len(ready)),
        "max_gpu_lora_adapters": 2.0,
    }

    gone = last_two[-1]
    path = Path(s.ads.get(gone)["spec"]["path"].removeprefix("file://"))  # maybe another module's
    s.ads.delete(gone)
    del want[gone]
    fleet.wait_for(lambda: converged(want), 60, lambda: f"{loaded(s)} != {want}")
    assert loaded(s)[1]["num_cpu_loaded_lora_adapters"] == len(ready) - 1

    s.ads.create(manifest(s.namespace, gone, path))
    want[gone] = "gpu"  # vLLM's add_lora activates what it loads: into the slot the delete freed
    levels, counts = fleet.wait_for(lambda: converged(want), 120, lambda: f"{loaded(s)} != {want}")
    assert (counts["num_gpu_loaded_lora_adapters"], counts["num_cpu_loaded_lora_adapters"]) == (2, len(ready))


def test_same_name_reload_never_serves_the_old_versions_prefix_cache(served: Served) -> None:
    """vLLM's prefix cache (on by default; loraplane leaves it on) keys KV blocks by the adapter's name
    and path. A new version under the same served name gets a new ID and its own cache directory, so
    its first request must find none of the old version's blocks: a name-keyed cache would hand it the
    old version's KV (vLLM #42125, #30931) and its output would drift from the new weights'."""
    import random

    s = served
    decode = decoder(s.base)
    rng = random.Random(10)
    block = 128  # vLLM's CPU KV block size
    prompt = [rng.randrange(3, 250) for _ in range(4 * block + 20)]  # four full blocks, cacheable
    max_tokens = 8
    v1 = models.make_peft_adapter(s.base, s.paths["alpha"].parent / "delta-v1", r=8, alpha=16, seed=11)
    v2 = models.make_peft_adapter(s.base, s.paths["alpha"].parent / "delta-v2", r=8, alpha=16, seed=12)
    want_v1 = decode(peft_greedy(s.base, v1, max_tokens, prompt))
    want_v2 = decode(peft_greedy(s.base, v2, max_tokens, prompt))
    assert want_v1 != want_v2, "the two versions answer this prompt differently"

    def counters() -> tuple[float, float]:
        m = s.worker.metrics()

        def total(name: str) -> float:
            return sum(v for k, v in m.items() if k.split("{")[0] == name)

        return total("vllm:prefix_cache_queries_total"), total("vllm:prefix_cache_hits_total")

    def ask() -> tuple[str, float, float]:
        """The greedy answer, and the prefix-cache queries and hits (tokens) that this request added."""
        q0, h0 = counters()
        out = s.client.completions.create(
            model="delta",
            prompt=prompt,
            max_tokens=max_tokens,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        # vLLM records a step's stats after handing out its outputs: wait for this request's query.
        q1, h1 = fleet.wait_for(
            lambda: (c := counters())[0] >= q0 + len(prompt) and c, 30, "the request's prefix-cache query"
        )
        return out.choices[0].text, q1 - q0, h1 - h0

    def served_id() -> int | None:
        listed = {m.id: (m.model_extra or {}).get("loraplane") or {} for m in s.client.models.list().data}
        return listed.get("delta", {}).get("id")

    s.kube.kubectl("apply", "-f", "-", input=yaml.safe_dump(manifest(s.namespace, "delta", v1)))
    old_id = fleet.wait_for(served_id, 120, lambda: s.worker.log()[-3000:])
    text, queries, hits = ask()
    assert text == want_v1, "version 1 serves its own weights"
    assert queries == len(prompt) and hits == 0, (queries, hits)
    text, queries, hits = ask()
    assert text == want_v1 and hits == 4 * block, f"the prefix cache holds version 1's blocks: {hits}"

    s.kube.kubectl(
        "patch", "lora", "delta", "-n", s.namespace, "--type", "merge",
        "-p", json.dumps({"spec": {"path": f"file://{v2}"}}),
    )  # fmt: skip
    new_id = fleet.wait_for(lambda: (i := served_id()) not in (None, old_id) and i, 120, "delta's new ID")
    text, queries, hits = ask()
    stale = "version 1's" if text == want_v1 else "neither version's"
    assert (queries, hits, text) == (len(prompt), 0, want_v2), (
        f"version 2 reused {hits:.0f} of {queries:.0f} prompt tokens of cached KV and answered "
        f"{stale if text != want_v2 else 'its own'} output: {text!r}, want {want_v2!r}"
    )
    text, queries, hits = ask()
    assert text == want_v2 and hits == 4 * block, f"version 2's own blocks are cached and hit: {hits}"
    assert new_id > old_id
