"""The Responses API (``POST /v1/responses``) for text generation: its request, response and stream
event shapes, over the chat path.

A Responses request is a chat request in another shape: ``instructions`` becomes the system message,
``input`` (a string, or messages with ``input_text`` / ``output_text`` parts) the conversation,
``max_output_tokens`` the token cap and ``text.format`` the structured-output format; it then runs
exactly as ``/v1/chat/completions`` does (the same template, adapter, limits and engine features).
Nothing is stored (``store: true``, ``previous_response_id`` are refused by name); built-in tools,
reasoning, background runs and the other fields vLLM also lacks for text generation are unknown
parameters, refused by name like any other.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field

from .protocol import (
    INT32_MAX,
    MAX_USER_CHARS,
    ChatCompletionRequest,
    JsonSchema,
    ResponseFormat,
    _Request,
    new_id,
    now,
)


class InputText(_Request):
    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | None = None  # an earlier output item sent back as history carries it


class InputMessage(_Request):
    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]
    id: str | None = Field(default=None, max_length=256)  # an earlier output item sent back
    status: str | None = Field(default=None, max_length=32)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class TextFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(default=None, min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Request):
    format: TextFormat | None = None


class ResponsesRequest(_Request):
    model: str = Field(min_length=1, max_length=256)
    input: str | Annotated[list[InputMessage], Field(min_length=1)]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stream: bool = False
    store: bool | None = None
    metadata: Annotated[dict[str, Annotated[str, Field(max_length=512)]], Field(max_length=16)] | None = None
    user: str | None = Field(default=None, max_length=MAX_USER_CHARS)
    text: TextConfig | None = None
    truncation: Literal["disabled"] | None = None
    parallel_tool_calls: bool | None = None
    tool_choice: Literal["none", "auto"] | None = None
    tools: Annotated[list[Any], Field(max_length=0)] | None = None  # none offered: text generation only

    def unsupported(self) -> list[tuple[str, str]]:
        if self.store:
            return [("store", "responses are not stored on this worker; send store: false (or leave it out)")]
        return []

    def to_chat(self) -> ChatCompletionRequest:
        """The same request as a chat completion (what runs it)."""
        messages: list[dict[str, Any]] = []
        if self.instructions is not None:
            messages.append({"role": "system", "content": self.instructions})
        if isinstance(self.input, str):
            messages.append({"role": "user", "content": self.input})
        else:
            messages += [{"role": m.role, "content": m.text()} for m in self.input]
        chat: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stream": self.stream,
        }
        if self.max_output_tokens is not None:
            chat["max_completion_tokens"] = self.max_output_tokens
        if self.user is not None:
            chat["user"] = self.user
        fmt = self.text.format if self.text else None
        request = ChatCompletionRequest.model_validate(chat)
        if fmt is not None and fmt.type != "text":
            schema = None
            if fmt.type == "json_schema":
                schema = JsonSchema.model_validate(
                    {"name": fmt.name or "output", "schema": fmt.schema_ or {}, "strict": fmt.strict}
                )
            request.response_format = ResponseFormat(type=fmt.type, json_schema=schema)
        return request


# --- the response ------------------------------------------------------------------------------------
class OutputText(BaseModel):
    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[Any] = Field(default_factory=list)


class OutputMessage(BaseModel):
    type: Literal["message"] = "message"
    id: str
    status: Literal["in_progress", "completed", "incomplete"]
    role: Literal["assistant"] = "assistant"
    content: list[OutputText]


class ResponseUsage(BaseModel):
    input_tokens: int
    output_tokens: int
    total_tokens: int
    input_tokens_details: dict[str, int] = Field(default_factory=lambda: {"cached_tokens": 0})
    output_tokens_details: dict[str, int] = Field(default_factory=lambda: {"reasoning_tokens": 0})


class Response(BaseModel):
    id: str
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=now)
    model: str
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    incomplete_details: dict[str, str] | None = None
    error: Any = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    metadata: dict[str, str] | None = None
    output: list[OutputMessage]
    parallel_tool_calls: bool = True
    temperature: float
    top_p: float
    tool_choice: str = "none"
    tools: list[Any] = Field(default_factory=list)
    text: dict[str, Any] = Field(default_factory=lambda: {"format": {"type": "text"}})
    truncation: str = "disabled"
    store: bool = False
    usage: ResponseUsage | None = None

    @classmethod
    def of(
        cls, request: ResponsesRequest, response_id: str, status: str, output: list[OutputMessage]
    ) -> Response:
        fmt = request.text.format if request.text and request.text.format else None
        return cls(
            id=response_id,
            model=request.model,
            status=status,  # type: ignore[arg-type]
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
            instructions=request.instructions,
            max_output_tokens=request.max_output_tokens,
            metadata=request.metadata,
            output=output,
            temperature=request.temperature,
            top_p=request.top_p,
            text={"format": fmt.model_dump(by_alias=True, exclude_none=True)}
            if fmt
            else {"format": {"type": "text"}},
        )


def status_of(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def new_ids() -> tuple[str, str]:
    """(response id, output message id)."""
    return new_id("resp"), new_id("msg")


class Event(BaseModel):
    """One stream event; the fields beyond ``type`` and ``sequence_number`` depend on the type."""

    model_config = {"extra": "allow"}

    type: str
    sequence_number: int


class Events:
    """Builds the stream's events in order (OpenAI's sequence for one text message)."""

    def __init__(self, request: ResponsesRequest, response_id: str, message_id: str) -> None:
        self.request, self.response_id, self.message_id = request, response_id, message_id
        self.seq = 0
        self.text = ""

    def _event(self, type_: str, **fields: Any) -> Event:
        event = Event(type=type_, sequence_number=self.seq, **fields)
        self.seq += 1
        return event

    def _message(self, status: str, text: str | None) -> dict[str, Any]:
        content = [] if text is None else [OutputText(text=text).model_dump()]
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def start(self) -> list[Event]:
        r = Response.of(self.request, self.response_id, "in_progress", []).model_dump()
        part = OutputText(text="").model_dump()
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        return [
            self._event("response.created", response=r),
            self._event("response.in_progress", response=r),
            self._event(
                "response.output_item.added", output_index=0, item=self._message("in_progress", None)
            ),
            self._event("response.content_part.added", part=part, **where),
        ]

    def delta(self, text: str) -> Event:
        self.text += text
        return self._event(
            "response.output_text.delta",
            item_id=self.message_id,
            output_index=0,
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def end(self, finish_reason: str | None, usage: ResponseUsage) -> list[Event]:
        status = status_of(finish_reason)
        where = {"item_id": self.message_id, "output_index": 0, "content_index": 0}
        item = self._message(status, self.text)
        done = Response.of(self.request, self.response_id, status, [OutputMessage.model_validate(item)])
        done.usage = usage
        return [
            self._event("response.output_text.done", text=self.text, logprobs=[], **where),
            self._event("response.content_part.done", part=OutputText(text=self.text).model_dump(), **where),
            self._event("response.output_item.done", output_index=0, item=item),
            self._event(f"response.{status}", response=done.model_dump()),
        ]
