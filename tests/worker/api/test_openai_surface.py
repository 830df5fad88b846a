"""What a client of ``vllm serve`` does, against the built-in engine through the official openai client:
``models.retrieve``, ``name`` on messages, a list of prompts in one completions request, an adapter's
own chat template, the Responses API; tool calling refused by name (the built-in engine has no
structured output to force a call with, nor a tool parser)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import openai
import pytest
from support.api import BASE, MakeServer, Served, reference_greedy, reference_text

from loraplane.worker import chattemplate

# Renders the participant's name, which the base model's template leaves out.
NAMED_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}{% if m.get('name') %}:{{ m['name'] }}{% endif %}>"
    "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture
def served(make_server: MakeServer, adapters: dict[str, Path], tmp_path: Path) -> Served:
    s = make_server(max_loras=2)
    s.add(1, "sql", adapters["a0"])
    own = Path(shutil.copytree(adapters["a1"], tmp_path / "own-template"))
    (own / chattemplate.TEMPLATE_FILE).write_text(NAMED_TEMPLATE)
    template, problems = chattemplate.read(own)  # as validation reads it
    assert not problems and template.source == "chat_template.jinja"
    s.add(2, "templated", own, chat_template=template.text)
    s.add(
        3, "broken", None, state="Failed", reason="RankTooLarge", message="rank 128 exceeds max_lora_rank 16"
    )
    return s


def client(s: Served) -> openai.OpenAI:
    return openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_retrieve(served: Served) -> None:
    c = client(served)
    card = c.models.retrieve("sql")
    assert (card.id, card.owned_by) == ("sql", "loraplane")
    assert card.model_extra["loraplane"] == {"id": 1, "baseModel": BASE, "adapter": "team/sql"}
    assert c.models.retrieve(BASE).model_extra["loraplane"]["id"] is None
    assert {m.id for m in c.models.list()} == {BASE, "sql", "templated"}
    with pytest.raises(openai.NotFoundError) as nf:
        c.models.retrieve("nope")
    assert nf.value.body["type"] == "ModelNotFound"
    with pytest.raises(openai.BadRequestError) as failed:
        c.models.retrieve("broken")
    assert "max_lora_rank" in failed.value.body["message"]


def test_prompt_list_answers_each_prompt_as_alone(served: Served) -> None:
    c = client(served)
    prompts = ["select name from users", "hello world", "the quick"]
    alone = [c.completions.create(model="sql", prompt=p, max_tokens=6, temperature=0) for p in prompts]
    both = c.completions.create(model="sql", prompt=prompts, max_tokens=6, temperature=0)
    assert [ch.index for ch in both.choices] == [0, 1, 2]
    assert [ch.text for ch in both.choices] == [a.choices[0].text for a in alone]
    assert both.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert both.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    ids = [served.engine.tokenizer.encode(p) for p in prompts[:2]]
    as_tokens = c.completions.create(model="sql", prompt=ids, max_tokens=6, temperature=0)
    assert [ch.text for ch in as_tokens.choices] == [a.choices[0].text for a in alone[:2]]
    stream = c.completions.create(
        model="sql",
        prompt=prompts,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    texts: dict[int, str] = {}
    finished: list[int] = []
    usage = None
    for chunk in stream:
        for ch in chunk.choices:
            texts[ch.index] = texts.get(ch.index, "") + ch.text
            if ch.finish_reason:
                finished.append(ch.index)
        usage = chunk.usage or usage
    assert [texts[i] for i in range(3)] == [a.choices[0].text for a in alone]
    assert sorted(finished) == [0, 1, 2]
    assert usage is not None and usage.completion_tokens == both.usage.completion_tokens


def test_prompt_list_bad_entry_fails_the_whole_request(served: Served) -> None:
    c = client(served)
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="sql", prompt=["hello", "x " * 400], max_tokens=4)
    assert e.value.body["type"] == "PromptTooLong"
    with pytest.raises(openai.BadRequestError) as e:
        c.completions.create(model="sql", prompt=["x"] * 65, max_tokens=1)
    assert e.value.body["param"] == "prompt"


def test_adapter_chat_template_renders_its_own_prompt_with_names(served: Served, peft_model: Any) -> None:
    """The adapter's own template (which renders ``name``) is used for its chat requests; the base
    model's template for the base model: the prompts differ, and each answer is PEFT's greedy answer
    to its own rendered prompt."""
    tok = served.engine.tokenizer
    eos = set(served.engine.runner.config.eos_token_id)
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello", "name": "alice"},
    ]
    c = client(served)
    own = NAMED_TEMPLATE
    base = tok.chat_template
    rendered_own = tok.apply_chat_template(
        messages, chat_template=own, add_generation_prompt=True, tokenize=False
    )
    rendered_base = tok.apply_chat_template(
        messages, chat_template=base, add_generation_prompt=True, tokenize=False
    )
    assert "<user:alice>hello" in rendered_own and rendered_own != rendered_base
    for model, adapter, text in (("templated", "a1", rendered_own), (BASE, None, rendered_base)):
        got = c.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
        ids = tok.encode(text, add_special_tokens=False)
        assert got.usage.prompt_tokens == len(ids), model
        want = reference_greedy(peft_model, adapter, ids, 6, eos)
        assert got.choices[0].message.content == reference_text(tok, want, eos), model


def test_tools_are_refused_by_name_on_the_builtin_engine(served: Served) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as e:
        client(served).chat.completions.create(
            model="sql", messages=[{"role": "user", "content": "hi"}], tools=[tool], tool_choice="required"
        )
    assert e.value.body["param"] == "tools" and "does not implement tools" in e.value.body["message"]
    # tool_choice "none" only renders the tools into the prompt: no engine feature, so it is served.
    none = client(served).chat.completions.create(
        model="sql",
        messages=[{"role": "user", "content": "hi"}],
        tools=[tool],
        tool_choice="none",
        max_tokens=2,
    )
    assert none.choices[0].message.tool_calls == [] and none.choices[0].message.content is not None
    # A conversation that carries earlier tool calls and results renders (no tools offered now).
    history = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    out = client(served).chat.completions.create(model="sql", messages=history, max_tokens=2)
    assert out.choices[0].message.tool_calls in (None, [])


def test_responses_api_is_the_chat_answer_in_its_shape(served: Served) -> None:
    c = client(served)
    chat = c.chat.completions.create(
        model="sql",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        max_tokens=7,
        temperature=0,
    )
    r = c.responses.create(
        model="sql", instructions="be brief", input="hello", max_output_tokens=7, temperature=0
    )
    assert r.output_text == chat.choices[0].message.content
    assert (r.usage.input_tokens, r.usage.output_tokens) == (
        chat.usage.prompt_tokens,
        chat.usage.completion_tokens,
    )
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    history = c.responses.create(
        model="sql",
        input=[
            {"role": "system", "content": "be brief"},
            {
                "role": "user",
                "content": [{"type": "input_text", "text": "hel"}, {"type": "input_text", "text": "lo"}],
            },
        ],
        max_output_tokens=7,
        temperature=0,
    )
    assert history.output_text == r.output_text
    events = list(
        c.responses.create(
            model="sql",
            instructions="be brief",
            input="hello",
            max_output_tokens=7,
            temperature=0,
            stream=True,
        )
    )
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types[-1] == f"response.{r.status}" and [e.sequence_number for e in events] == list(
        range(len(events))
    )
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert events[-1].response.output_text == r.output_text
    assert events[-1].response.usage.output_tokens == r.usage.output_tokens


def test_responses_api_refuses_what_it_does_not_do_by_name(served: Served) -> None:
    c = client(served)
    for kw, param in (
        ({"store": True}, "store"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
    ):
        with pytest.raises(openai.BadRequestError) as e:
            c.responses.create(model="sql", input="hi", max_output_tokens=2, **kw)
        assert e.value.body["param"] == param, kw
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="nope", input="hi")
