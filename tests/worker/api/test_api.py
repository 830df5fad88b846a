"""The OpenAI API through the official client and raw HTTP: models, completions, chat, streaming,
usage, errors in OpenAI's shape, auth, health, readiness and metrics."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from support.api import BASE, MakeServer, Served, reference_greedy, reference_text

from loraplane.worker.inference.sampling import SamplingParams


@pytest.fixture
def served(make_server: MakeServer, adapters: dict[str, Path]) -> Served:
    s = make_server(max_loras=2)
    s.add(1, "sql", adapters["a0"])
    s.add(2, "chat", adapters["a2"], max_length=24)
    s.add(
        3, "broken", None, state="Failed", reason="RankTooLarge", message="rank 128 exceeds max_lora_rank 16"
    )
    s.add(4, "coming", None, state="Prefetching")
    return s


def client(s: Served, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0, timeout=30)


def test_models_lists_base_and_ready_adapters_with_ids(served: Served) -> None:
    cards = {m.id: m.model_extra for m in client(served).models.list()}
    assert set(cards) == {BASE, "sql", "chat"}
    assert cards["sql"]["loraplane"] == {"id": 1, "baseModel": BASE, "adapter": "team/sql"}
    assert cards[BASE]["loraplane"]["id"] is None


def test_completion_matches_peft_greedy_and_counts_usage(served: Served, peft_model: Any) -> None:
    tok = served.engine.tokenizer
    eos = set(served.engine.runner.config.eos_token_id)
    prompt = "select name from users"
    ids = tok.encode(prompt)
    for model, adapter in [("sql", "a0"), (BASE, None)]:
        got = client(served).completions.create(model=model, prompt=prompt, max_tokens=12, temperature=0)
        want = reference_greedy(peft_model, adapter, ids, 12, eos)
        assert got.choices[0].text == reference_text(tok, want, eos), model
        assert got.usage is not None
        assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), len(want))
        assert got.choices[0].finish_reason == ("stop" if want[-1] in eos else "length")


def test_streaming_completion_concatenates_to_the_same_text(served: Served) -> None:
    c = client(served)
    whole = c.completions.create(model="sql", prompt="hello world", max_tokens=10, temperature=0)
    chunks = list(
        c.completions.create(
            model="sql",
            prompt="hello world",
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    assert text == whole.choices[0].text
    assert (
        chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    )
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]


def test_chat_uses_the_template_and_streams(served: Served, peft_model: Any) -> None:
    tok = served.engine.tokenizer
    eos = set(served.engine.runner.config.eos_token_id)
    messages = [{"role": "user", "content": "hello"}]
    c = client(served)
    got = c.chat.completions.create(model="chat", messages=messages, max_tokens=6, temperature=0)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = tok.encode(text, add_special_tokens=False)
    want = reference_greedy(peft_model, "a2", ids, 6, eos)
    assert got.choices[0].message.content == reference_text(tok, want, eos)
    assert got.usage.prompt_tokens == len(ids)
    stream = list(
        c.chat.completions.create(model="chat", messages=messages, max_tokens=6, temperature=0, stream=True)
    )
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == got.choices[0].message.content


def test_seed_reproduces_and_stop_sequences_cut(served: Served) -> None:
    c = client(served)
    kw: dict[str, Any] = dict(model="sql", prompt="the quick", max_tokens=12, temperature=1.0, top_p=0.9)
    a = c.completions.create(seed=7, **kw).choices[0].text
    b = c.completions.create(seed=7, **kw).choices[0].text
    assert a == b
    greedy = c.completions.create(model="sql", prompt="the quick", max_tokens=12, temperature=0).choices[0]
    top1 = c.completions.create(extra_body={"top_k": 1}, **kw).choices[0]
    assert top1.text == greedy.text
    text = greedy.text
    if len(text) >= 4:
        stop = text[2:4]
        cut = c.completions.create(model="sql", prompt="the quick", max_tokens=12, temperature=0, stop=[stop])
        assert cut.choices[0].text == text[: text.index(stop)]
        assert cut.choices[0].finish_reason == "stop"


def _post(s: Served, path: str, body: Any, **kw: Any) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(s.url + path, content=body, headers={"Content-Type": "application/json"}, **kw)
    return httpx.post(s.url + path, json=body, **kw)


# (case, path, body, status, type, code, message fragment)
ERROR_CASES = [
    (
        "unknown model",
        "/v1/completions",
        {"model": "nope", "prompt": "x"},
        404,
        "ModelNotFound",
        "model_not_found",
        "/v1/models",
    ),
    (
        "failed adapter",
        "/v1/completions",
        {"model": "broken", "prompt": "x"},
        400,
        "RankTooLarge",
        "adapter_failed",
        "max_lora_rank",
    ),
    (
        "not ready",
        "/v1/completions",
        {"model": "coming", "prompt": "x"},
        503,
        "AdapterNotReady",
        "model_not_ready",
        "Prefetching",
    ),
    (
        "longContext",
        "/v1/completions",
        {"model": "chat", "prompt": "hello world", "max_tokens": 20},
        400,
        "PromptTooLong",
        "context_length_exceeded",
        "longContext.maxLength",
    ),
    (
        "base length",
        "/v1/completions",
        {"model": BASE, "prompt": "x", "max_tokens": 300},
        400,
        "PromptTooLong",
        "context_length_exceeded",
        "limit of 256",
    ),
    ("bad json", "/v1/completions", b"{nope", 400, "InvalidJson", "invalid_json", "not valid JSON"),
    ("no prompt", "/v1/completions", {"model": "sql"}, 400, "InvalidRequest", "invalid_value", "prompt"),
    (
        "temperature",
        "/v1/completions",
        {"model": "sql", "prompt": "x", "temperature": 5},
        400,
        "InvalidRequest",
        "invalid_value",
        "temperature",
    ),
    (
        "n",
        "/v1/completions",
        {"model": "sql", "prompt": "x", "n": 2},
        400,
        "UnsupportedParameter",
        "unsupported",
        "does not implement n",
    ),
    *(
        (
            f"builtin lacks {field}",
            "/v1/chat/completions" if field == "top_logprobs" else "/v1/completions",
            {"model": "sql", "prompt": "x", **extra}
            if field != "top_logprobs"
            else {"model": "sql", "messages": [{"role": "user", "content": "x"}], **extra},
            400,
            "UnsupportedParameter",
            "unsupported",
            f"does not implement {field.replace('top_', '')}",
        )
        for field, extra in (
            ("response_format", {"response_format": {"type": "json_object"}}),
            ("presence_penalty", {"presence_penalty": 0.5}),
            ("frequency_penalty", {"frequency_penalty": -0.5}),
            ("repetition_penalty", {"repetition_penalty": 1.2}),
            ("min_p", {"min_p": 0.1}),
            ("logit_bias", {"logit_bias": {"5": 10}}),
            ("logprobs", {"logprobs": 2}),
            ("top_logprobs", {"logprobs": True, "top_logprobs": 2}),
        )
    ),
    (
        "token range",
        "/v1/completions",
        {"model": "sql", "prompt": [1, 99999]},
        400,
        "TokenOutOfRange",
        "invalid_value",
        "[0,",
    ),
    (
        "empty prompt",
        "/v1/completions",
        {"model": "sql", "prompt": ""},
        400,
        "EmptyPrompt",
        "invalid_value",
        "empty",
    ),
    (
        "empty stop",
        "/v1/completions",
        {"model": "sql", "prompt": "x", "stop": [""]},
        400,
        "InvalidRequest",
        "invalid_value",
        "stop",
    ),
    (
        "no messages",
        "/v1/chat/completions",
        {"model": "sql", "messages": []},
        400,
        "InvalidRequest",
        "invalid_value",
        "messages",
    ),
    (
        "chat unknown",
        "/v1/chat/completions",
        {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
        404,
        "ModelNotFound",
        "model_not_found",
        "nope",
    ),
    (
        "too large",
        "/v1/completions",
        {"model": "sql", "prompt": "x" * (2 << 20)},
        413,
        "RequestTooLarge",
        "request_too_large",
        "bytes",
    ),
    ("no route", "/v1/embeddings", {"model": "sql"}, 404, "NotFound", "NotFound", ""),
]


@pytest.mark.parametrize(
    ("case", "path", "body", "status", "type_", "code", "fragment"),
    ERROR_CASES,
    ids=[c[0] for c in ERROR_CASES],
)
def test_errors_have_openai_shape(
    served: Served, case: str, path: str, body: Any, status: int, type_: str, code: str, fragment: str
) -> None:
    r = _post(served, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert (error["type"], error["code"]) == (type_, code)
    assert fragment in error["message"]
    assert set(error) == {"message", "type", "param", "code"}
    if status == 503:
        assert int(r.headers["Retry-After"]) > 0


def test_openai_client_raises_typed_errors(served: Served) -> None:
    c = client(served)
    with pytest.raises(openai.NotFoundError) as nf:
        c.completions.create(model="nope", prompt="x")
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="chat", prompt="hello", max_tokens=100)


def test_chat_without_template_names_the_reason(served: Served) -> None:
    tok = served.engine.tokenizer
    template, tok.chat_template = tok.chat_template, None
    try:
        r = _post(
            served, "/v1/chat/completions", {"model": "sql", "messages": [{"role": "user", "content": "x"}]}
        )
    finally:
        tok.chat_template = template
    assert r.status_code == 400
    assert r.json()["error"]["type"] == "ChatTemplateMissing"


def test_full_queue_answers_429(make_server: MakeServer) -> None:
    s = make_server(start=False, max_waiting=2)  # the engine thread is not running: nothing drains
    for i in range(2):
        s.engine.submit(
            request_id=f"held-{i}",
            model=BASE,
            adapter=None,
            prompt_ids=[1, 2],
            params=SamplingParams(max_tokens=2),
            on_output=lambda out: None,
        )
    r = _post(s, "/v1/completions", {"model": BASE, "prompt": "x"})
    assert r.status_code == 429
    assert r.json()["error"]["type"] == "QueueFull"
    assert int(r.headers["Retry-After"]) >= 1
    with pytest.raises(openai.RateLimitError):
        client(s).completions.create(model=BASE, prompt="x")


def test_api_key_required_when_configured(make_server: MakeServer) -> None:
    s = make_server(api_keys=("sekret-1",))
    r = httpx.get(s.url + "/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(s.url + "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert [m.id for m in client(s, "sekret-1").models.list()] == [BASE]
    assert httpx.get(s.url + "/health").status_code == 200  # probes need no key


def test_health_ready_and_metrics(served: Served) -> None:
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}
    assert httpx.get(served.url + "/ready").status_code == 200
    client(served).completions.create(model="sql", prompt="hello", max_tokens=3, temperature=0)
    _post(served, "/v1/completions", {"model": "no-such-model", "prompt": "x"})
    text = httpx.get(served.url + "/metrics").text
    for line in [
        'loraplane_worker_requests_total{model="sql",status="200"} 1.0',
        'loraplane_worker_requests_total{model="unknown",status="404"} 1.0',
        'loraplane_worker_generation_tokens_total{model="sql"}',
        'loraplane_worker_prompt_tokens_total{model="sql"}',
        'loraplane_worker_time_to_first_token_seconds_count{model="sql"} 1.0',
        "loraplane_worker_batch_size_count",
        'loraplane_worker_adapter_loads_total{tier="device"} 1.0',
        'loraplane_worker_adapter_loads_total{tier="cpu"} 1.0',
    ]:
        assert line in text, line
    assert "no-such-model" not in text  # unknown names do not grow label sets


def test_ready_waits_for_the_base_model(tiny_llama: Path) -> None:
    from loraplane.worker.api.webapp import build_app, serve_in_thread
    from loraplane.worker.builtin.service import Engine, EngineSettings
    from loraplane.worker.inference.engines import EngineSlot
    from loraplane.worker.registry import Registry

    registry = Registry()
    slot = EngineSlot()
    app = build_app(slot, registry)
    with serve_in_thread(app) as url:
        assert httpx.get(url + "/ready").status_code == 503
        r = httpx.post(url + "/v1/completions", json={"model": BASE, "prompt": "x"})
        assert r.status_code == 503 and r.json()["error"]["type"] == "EngineLoading"
        engine = Engine.start(tiny_llama, EngineSettings(served_model_name=BASE))
        try:
            slot.fill(engine)
            assert httpx.get(url + "/ready").status_code == 200
        finally:
            engine.stop()


def test_client_disconnect_cancels_the_request(served: Served) -> None:
    body = {
        "model": "sql",
        "prompt": "hello",
        "max_tokens": 200,
        "temperature": 0,
        "stream": True,
        "ignore_eos": True,
    }
    with httpx.stream("POST", served.url + "/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    sched = served.engine.scheduler
    done = threading.Event()
    for _ in range(200):
        if not sched.running and not sched.waiting:
            done.set()
            break
        done.wait(0.05)
    assert done.is_set(), "the engine kept generating for a client that left"
    assert served.engine.tiers.running == {}
