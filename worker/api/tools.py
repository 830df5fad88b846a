"""Tool calling on the OpenAI chat API: the wire shapes, and what ``tool_choice`` makes of the output.

``tool_choice`` "required" or a named function is forced the way vLLM's own server forces it: the
engine's structured output constrains the text to JSON matching the tools' parameter schemas (a named
function: its arguments object; "required": a list of ``{"name", "parameters"}``), so the answer always
parses, whatever the model. "auto" lets the model decide; a tool parser for its chat format (vLLM's
own parser classes, chosen per pool like ``--tool-call-parser``) finds the calls in the text; a pool
with no parser refuses "auto" by name. "none" renders the tools into the prompt and parses nothing.
"""

from __future__ import annotations

import json
import uuid
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from .protocol import ChatCompletionRequest

MAX_TOOLS = 128
"""Most tools (and tool calls in one message) a request may carry: OpenAI's own limit."""
MAX_FUNCTION_NAME = 64


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class FunctionDefinition(_Strict):
    name: str = Field(min_length=1, max_length=MAX_FUNCTION_NAME, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class NamedFunction(_Strict):
    name: str = Field(min_length=1, max_length=MAX_FUNCTION_NAME)


class NamedToolChoice(_Strict):
    type: Literal["function"] = "function"
    function: NamedFunction


class FunctionCall(BaseModel):
    name: str
    arguments: str
    """A JSON object, as text (OpenAI's shape)."""


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCall(BaseModel):
    """A call in a response, and in an assistant message sent back in a later turn."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(default_factory=call_id, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall

    def for_template(self) -> dict[str, Any]:
        """As chat templates read it: the arguments as an object (vLLM does the same), when they parse."""
        try:
            arguments: Any = json.loads(self.function.arguments)
        except ValueError:
            arguments = self.function.arguments
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.function.name, "arguments": arguments},
        }


class DeltaFunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunctionCall | None = None


def unsupported(request: ChatCompletionRequest) -> list[tuple[str, str]]:
    """(field, message) for tool fields that cannot be honoured as sent."""
    found: list[tuple[str, str]] = []
    choice = request.tool_choice
    if choice is not None and choice != "none" and not request.tools:
        found.append(("tool_choice", "tool_choice needs tools: list the functions the model may call"))
    if isinstance(choice, BaseModel) and request.tools:
        names = [t.function.name for t in request.tools]
        if choice.function.name not in names:
            found.append(
                (
                    "tool_choice",
                    f"tool_choice names {choice.function.name!r}, which is not in tools ({', '.join(names)})",
                )
            )
    if request.tools and choice not in (None, "none", "auto") and request.response_format is not None:
        found.append(
            (
                "response_format",
                "response_format cannot be combined with tool_choice required or a named function",
            )
        )
    return found


def _parameters(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def guided_schema(request: ChatCompletionRequest) -> dict[str, Any] | None:
    """The response_format that forces the tool call(s), or None when the model chooses (auto, none)."""
    choice, tools = request.tool_choice, request.tools or []
    if isinstance(choice, NamedToolChoice):
        tool = next(t for t in tools if t.function.name == choice.function.name)
        schema = _parameters(tool)
        name = tool.function.name
    elif choice == "required":
        # As vLLM's server: a list of {"name", "parameters"}, each item one of the tools.
        items = [
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "enum": [t.function.name]},
                    "parameters": _parameters(t),
                },
                "required": ["name", "parameters"],
            }
            for t in tools
        ]
        schema = {"type": "array", "minItems": 1, "items": {"type": "object", "anyOf": items}}
        if request.parallel_tool_calls is False:
            schema["maxItems"] = 1
        name = "tool_calls"
    else:
        return None
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}


def forced_calls(request: ChatCompletionRequest, text: str) -> list[ToolCall] | None:
    """The calls in a forced (named / required) answer; None if the text is not the JSON the schema
    asked for (cut short by max_tokens: then it is returned as content, as vLLM does)."""
    choice = request.tool_choice
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if isinstance(choice, NamedToolChoice):
        return [ToolCall(function=FunctionCall(name=choice.function.name, arguments=json.dumps(value)))]
    if not isinstance(value, list):
        return None
    return [
        ToolCall(function=FunctionCall(name=c["name"], arguments=json.dumps(c["parameters"])))
        for c in value
        if isinstance(c, dict) and "name" in c and "parameters" in c
    ]


def is_forced(request: ChatCompletionRequest) -> bool:
    return bool(request.tools) and (
        request.tool_choice == "required" or isinstance(request.tool_choice, NamedToolChoice)
    )


class Parser(Protocol):
    """One choice's tool parser for "auto" (an engine's, e.g. vLLM's parser classes): plain dicts in
    OpenAI's shape, so the engine side needs none of the API's models."""

    def whole(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        """(content, tool calls) of a finished answer."""
        ...

    def delta(self, text: str, token_ids: list[int], finished: bool) -> dict[str, Any] | None:
        """The next streamed delta (``content`` and/or ``tool_calls``), or None to send nothing yet."""
        ...


class Calls:
    """What each choice's generated text becomes: content (tool_choice none, or no tools), or tool
    calls. ``Calls.of`` picks the subclass for a request's tool_choice."""

    def __init__(self, request: ChatCompletionRequest) -> None:
        self.request = request
        self.called: set[int] = set()  # choices that produced tool calls

    @staticmethod
    def of(request: ChatCompletionRequest, engine: Any) -> Calls:
        choice = request.effective_tool_choice() if request.tools else "none"
        if isinstance(choice, NamedToolChoice):
            return _Named(request)
        if choice == "required":
            return _Required(request)
        if choice == "auto":
            return _Auto(request, engine)
        return Calls(request)

    def whole(self, index: int, text: str) -> tuple[str | None, list[ToolCall]]:
        return text, []

    def delta(self, index: int, out: Any) -> Any:
        from .protocol import Delta

        return Delta(content=out.text) if out.text else None

    def finish_reason(self, index: int, finish: str | None) -> str | None:
        return finish


class _Named(Calls):
    """The whole answer is the named function's arguments (streamed as they come, as vLLM does)."""

    def whole(self, index: int, text: str) -> tuple[str | None, list[ToolCall]]:
        assert isinstance(self.request.tool_choice, NamedToolChoice)
        name = self.request.tool_choice.function.name
        return "", [ToolCall(function=FunctionCall(name=name, arguments=text))]

    def delta(self, index: int, out: Any) -> Any:
        from .protocol import Delta

        if not out.text:
            return None
        function = DeltaFunctionCall(arguments=out.text)
        if index in self.called:
            return Delta(tool_calls=[DeltaToolCall(index=0, function=function)])
        self.called.add(index)
        assert isinstance(self.request.tool_choice, NamedToolChoice)
        function.name = self.request.tool_choice.function.name
        return Delta(tool_calls=[DeltaToolCall(index=0, id=call_id(), type="function", function=function)])


class _Required(Calls):
    """A JSON list of {"name", "parameters"}; streamed as whole calls once the list is complete."""

    def __init__(self, request: ChatCompletionRequest) -> None:
        super().__init__(request)
        self.texts: dict[int, str] = {}

    def whole(self, index: int, text: str) -> tuple[str | None, list[ToolCall]]:
        found = forced_calls(self.request, text)
        return ("", found) if found else (text, [])

    def delta(self, index: int, out: Any) -> Any:
        from .protocol import Delta

        self.texts[index] = self.texts.get(index, "") + out.text
        if out.finish_reason is None:
            return None
        content, found = self.whole(index, self.texts.pop(index))
        if not found:
            return Delta(content=content)
        return Delta(
            tool_calls=[
                DeltaToolCall(
                    index=i,
                    id=c.id,
                    type="function",
                    function=DeltaFunctionCall(name=c.function.name, arguments=c.function.arguments),
                )
                for i, c in enumerate(found)
            ]
        )

    def finish_reason(self, index: int, finish: str | None) -> str | None:
        return "tool_calls" if finish == "stop" else finish  # as OpenAI and vLLM answer "required"


class _Auto(Calls):
    """The model decides; the engine's tool parser finds calls in its text (one parser per choice)."""

    def __init__(self, request: ChatCompletionRequest, engine: Any) -> None:
        super().__init__(request)
        self.new_parser = engine.tool_parser(request)
        self.parsers: dict[int, Parser] = {}

    def _parser(self, index: int) -> Parser:
        if index not in self.parsers:
            self.parsers[index] = self.new_parser()
        return self.parsers[index]

    def whole(self, index: int, text: str) -> tuple[str | None, list[ToolCall]]:
        content, found = self.new_parser().whole(text)
        if found:
            self.called.add(index)
        return content, [ToolCall.model_validate(c) for c in found]

    def delta(self, index: int, out: Any) -> Any:
        from .protocol import Delta

        d = self._parser(index).delta(out.text, list(out.token_ids), out.finish_reason is not None)
        if d is None:
            return None
        if d.get("tool_calls"):
            self.called.add(index)
        return Delta.model_validate({"content": d.get("content"), "tool_calls": d.get("tool_calls")})

    def finish_reason(self, index: int, finish: str | None) -> str | None:
        # As vLLM: "tool_calls" when the answer held calls (streamed: tracked per choice).
        if finish == "stop" and index in self.called:
            return "tool_calls"
        return finish
