"""What tool_choice makes of generated text (api/tools.py), without an engine: the guided schema a
forced call is generated under, and the calls and stream deltas read back from the text. (The
end-to-end tests with vLLM's structured output and parsers are in tests/vllm_engine/test_openai.py.)"""

from __future__ import annotations

import json
from typing import Any

from loraplane.worker.api import tools
from loraplane.worker.api.protocol import ChatCompletionRequest
from loraplane.worker.inference.engines import Output

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


def request(**kw: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": [WEATHER, TIME], **kw}
    )


def stream(calls: tools.Calls, pieces: list[str]) -> list[Any]:
    outs = [Output(p, [1], "stop" if i == len(pieces) - 1 else None, 3, i + 1) for i, p in enumerate(pieces)]
    return [d for o in outs if (d := calls.delta(0, o)) is not None]


def test_named_choice_is_its_arguments_streamed_as_generated() -> None:
    r = request(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert r.extras()["response_format"]["json_schema"]["schema"] == WEATHER["function"]["parameters"]
    calls = tools.Calls.of(r, engine=None)
    content, (call,) = calls.whole(0, '{"city":"Paris"}')
    assert (content, call.function.name, call.function.arguments) == ("", "get_weather", '{"city":"Paris"}')
    assert calls.finish_reason(0, "stop") == "stop"
    deltas = stream(tools.Calls.of(r, engine=None), ['{"ci', 'ty":"Par', 'is"}'])
    first = deltas[0].tool_calls[0]
    assert first.function.name == "get_weather" and first.id and first.type == "function"
    assert all(d.tool_calls[0].function.name is None and d.tool_calls[0].id is None for d in deltas[1:])
    assert "".join(d.tool_calls[0].function.arguments for d in deltas) == '{"city":"Paris"}'


def test_required_choice_is_a_list_of_calls() -> None:
    r = request(tool_choice="required", parallel_tool_calls=False)
    schema = r.extras()["response_format"]["json_schema"]["schema"]
    assert schema["maxItems"] == 1 and [
        s["properties"]["name"]["enum"] for s in schema["items"]["anyOf"]
    ] == [
        ["get_weather"],
        ["get_time"],
    ]
    text = '[{"name":"get_time","parameters":{}}]'
    calls = tools.Calls.of(r, engine=None)
    _, (call,) = calls.whole(0, text)
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {})
    assert calls.finish_reason(0, "stop") == "tool_calls"
    (delta,) = stream(tools.Calls.of(r, engine=None), [text[:9], text[9:]])
    assert [(c.function.name, c.function.arguments) for c in delta.tool_calls] == [("get_time", "{}")]
    cut = tools.Calls.of(r, engine=None).whole(0, '[{"name":"get_ti')  # cut by max_tokens: content
    assert cut == ('[{"name":"get_ti', [])


def test_none_and_no_tools_leave_the_text_as_content() -> None:
    for r in (
        request(tool_choice="none"),
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}]}),
    ):
        calls = tools.Calls.of(r, engine=None)
        assert calls.whole(0, "hello") == ("hello", []) and "response_format" not in r.extras()


def test_tool_fields_that_cannot_be_honoured_are_named() -> None:
    assert (
        request(tool_choice={"type": "function", "function": {"name": "nope"}}).unsupported()[0][0]
        == "tool_choice"
    )
    bare = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}
    )
    assert bare.unsupported()[0][0] == "tool_choice"
    both = request(tool_choice="required", response_format={"type": "json_object"})
    assert both.unsupported()[0][0] == "response_format"
    assert request().extras()["tools"] == "auto"  # OpenAI's default with tools
