"""The OpenAI wire format: pydantic request and response models, and the error shape.

Request models own their conversion to the engine's ``SamplingParams`` and to prompt token IDs,
so routes stay thin. Every field is typed strictly and bounded to what an engine can take (seeds are
int64, counts int32, stop lists short): a value outside gets a 400 naming the field before anything
reaches the engine thread. Engine features (n > 1, logprobs, penalties, logit_bias, min_p,
response_format) go to the engine as ``extras()``; an engine that lacks one refuses it by name. Fields
no engine implements (echo, suffix) are refused with a 400 that names them, and so are unknown fields (as OpenAI does): nothing a client sends is ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from loraplane.errors import PermanentError

from ..inference.sampling import MAX_STOP_CHARS, MAX_STOP_SEQUENCES, SamplingParams
from . import tools as _tools

INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # seeds: what torch and vLLM take (OpenAI's int64)
MAX_N = 16
"""Most choices one request may ask for: one tenant's request must not fill a shared batch."""
MAX_LOGPROBS = 20
"""Most alternatives per token (vLLM's default max_logprobs)."""
MAX_USER_CHARS = 256
MAX_NAME_CHARS = 256

TokenId = Annotated[int, Field(ge=0, le=INT32_MAX)]
Stop = Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False


class _Request(BaseModel):
    """Strict types (no "10" for 10, no 1 for true) and no unknown fields: OpenAI's own behaviour."""

    model_config = ConfigDict(extra="forbid", strict=True)


class JsonSchema(_Request):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    """OpenAI's response_format: text, json_object (any JSON), json_schema (JSON matching a schema)."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is json_schema")
        return self


class _Common(_Request):
    """Fields completions and chat share."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1, le=INT32_MAX)
    seed: int | None = Field(default=None, ge=INT64_MIN, le=INT64_MAX)
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    logprobs: bool | Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    ignore_eos: bool = False
    user: str | None = Field(default=None, max_length=MAX_USER_CHARS)
    # Engine features (engines.FEATURES): an engine that lacks one refuses it by name (see extras()).
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=2.0)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    logit_bias: (
        Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=300)] | None
    ) = None
    response_format: ResponseFormat | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, message) for each field set to something no engine implements."""
        return []

    def extras(self) -> dict[str, Any]:
        """The engine features this request uses (name -> engine-ready value); defaults are left out."""
        out: dict[str, Any] = {}
        if self.n != 1:
            out["n"] = self.n
        logprobs = self.top_logprobs_wanted()
        if logprobs is not None:
            out["logprobs"] = logprobs
        for name, neutral in (
            ("presence_penalty", 0.0),
            ("frequency_penalty", 0.0),
            ("repetition_penalty", 1.0),
            ("min_p", 0.0),
        ):
            if getattr(self, name) != neutral:
                out[name] = getattr(self, name)
        if self.logit_bias:
            try:
                out["logit_bias"] = {int(k): float(v) for k, v in self.logit_bias.items()}
            except ValueError:
                raise PermanentError("InvalidRequest", "logit_bias keys must be token IDs") from None
        if self.response_format is not None and self.response_format.type != "text":
            out["response_format"] = self.response_format.model_dump(by_alias=True, exclude_none=True)
        return out

    def top_logprobs_wanted(self) -> int | None:
        """None: no logprobs; k: the chosen token's logprob and the k most likely alternatives."""
        if self.logprobs is None or self.logprobs is False:
            return None
        return 0 if self.logprobs is True else int(self.logprobs)

    def sampling_params(self, max_tokens: int | None) -> SamplingParams:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


MAX_PROMPTS = 64
"""Most prompts one completions request may list."""
MAX_CHOICES = 64
"""Most choices (prompts x n) one request may ask for: one tenant's request must not fill a shared batch."""


class CompletionRequest(_Common):
    prompt: (
        str
        | list[TokenId]
        | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
        | Annotated[list[list[TokenId]], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    echo: bool = False
    suffix: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.echo:
            found.append(("echo", "echo is not supported"))
        if self.suffix:
            found.append(("suffix", "suffix is not supported"))
        return found

    def prompt_list(self) -> list[str | list[int]]:
        """The prompts, one entry each: a list of strings or of token-ID lists is several prompts."""
        prompt: Any = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return list(prompt)
        return [prompt]

    def to_sampling_params(self) -> SamplingParams:
        return self.sampling_params(16 if self.max_tokens is None else self.max_tokens)  # OpenAI's default

    def prompts(self, tokenizer: Any, limit: int, chat_template: str | None = None) -> list[list[int]]:
        """Each prompt's token IDs (``chat_template`` is for chat requests only)."""
        return [
            encode(tokenizer, p, limit) if isinstance(p, str) else [int(t) for t in p]
            for p in self.prompt_list()
        ]


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    """The participant's name: passed to the chat template (as vLLM does), which may render it."""
    tool_calls: list[_tools.ToolCall] | None = Field(default=None, max_length=_tools.MAX_TOOLS)
    """An assistant turn's earlier tool calls."""
    tool_call_id: str | None = Field(default=None, max_length=MAX_NAME_CHARS)
    """A tool turn: which call this is the result of."""

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (HF's shape; tool-call arguments as objects)."""
        m: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.name is not None:
            m["name"] = self.name
        if self.tool_calls:
            m["tool_calls"] = [c.for_template() for c in self.tool_calls]
        if self.tool_call_id is not None:
            m["tool_call_id"] = self.tool_call_id
        return m


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # Tool calling (tools.py): an engine feature ("tools"), refused by name where an engine lacks it.
    tools: Annotated[list[_tools.Tool], Field(max_length=_tools.MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | _tools.NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.top_logprobs is not None and self.logprobs is not True:
            found.append(("top_logprobs", "top_logprobs needs logprobs: true"))
        found += _tools.unsupported(self)
        return found

    def extras(self) -> dict[str, Any]:
        out = super().extras()
        if self.tools and self.effective_tool_choice() != "none":  # "none": only rendered into the prompt
            out["tools"] = self.effective_tool_choice()
            schema = _tools.guided_schema(self)
            if schema is not None:  # named or required: the engine's structured output forces the call
                out["response_format"] = schema
        return out

    def effective_tool_choice(self) -> str | _tools.NamedToolChoice:
        """OpenAI's default: "auto" when tools are given, else "none"."""
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"

    def top_logprobs_wanted(self) -> int | None:
        if self.logprobs is None or self.logprobs is False:
            return None
        return self.top_logprobs or 0

    def to_sampling_params(self) -> SamplingParams:
        # No max given: up to the length limit (the scheduler stops there with finish_reason "length").
        return self.sampling_params(self.max_completion_tokens or self.max_tokens)

    def render(self, tokenizer: Any, chat_template: str | None = None) -> str:
        """The prompt text: ``chat_template`` (an adapter's own) or else the tokenizer's."""
        template = chat_template or getattr(tokenizer, "chat_template", None)
        if not template:
            raise PermanentError(
                "ChatTemplateMissing",
                "this base model's tokenizer has no chat template; use /v1/completions with a prompt",
            )
        messages = [m.for_template() for m in self.messages]
        kw: dict[str, Any] = {}
        if self.tools:
            kw["tools"] = [t.model_dump(exclude_none=True) for t in self.tools]
        return tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False, **kw
        )

    def prompts(self, tokenizer: Any, limit: int, chat_template: str | None = None) -> list[list[int]]:
        return [encode(tokenizer, self.render(tokenizer, chat_template), limit, add_special_tokens=False)]


PROBE_CHARS_PER_TOKEN = 8
"""A text longer than this many characters per allowed token is measured on a prefix first."""


def encode(tokenizer: Any, text: str, limit: int, **kw: Any) -> list[int]:
    """``text``'s token IDs; a text far above ``limit`` tokens is refused after encoding a prefix.

    Encoding a 1 MiB prompt takes seconds of CPU; typical text is about 4 characters a token, so
    when the first ``limit * 8`` characters alone are already over the limit, the rest is never
    encoded. (Text that packs more characters into a token is encoded whole; the body cap bounds it.)
    """
    probe = limit * PROBE_CHARS_PER_TOKEN
    if len(text) > probe:
        n = len(tokenizer.encode(text[:probe], **kw))
        if n > limit + 8:  # + 8: the cut may split a word into a few extra tokens
            raise PermanentError(
                "PromptTooLong",
                f"the prompt is over {limit} tokens, the limit for this model (its first {probe} "
                f"characters alone are {n} tokens); shorten the prompt",
            )
    return list(tokenizer.encode(text, **kw))


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt: int, completion: int) -> Usage:
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per generated token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)

    def add(self, entries: list[Any], offset: int) -> None:
        """Append engine TokenLogprob entries; ``offset``: characters of text before the first."""
        for e in entries:
            self.tokens.append(e.token)
            self.token_logprobs.append(e.logprob)
            self.top_logprobs.append(dict(e.top))
            self.text_offset.append(offset)
            offset += len(e.token)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)

    def add(self, entries: list[Any]) -> None:
        for e in entries:
            top = [TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in e.top]
            self.content.append(
                ChatTokenLogprob(
                    token=e.token, logprob=e.logprob, bytes=list(e.token.encode()), top_logprobs=top
                )
            )


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[_tools.ToolCall] = Field(default_factory=list)


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[_tools.DeltaToolCall] | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class LoraplaneModelInfo(BaseModel):
    """What loraplane adds to an OpenAI model card."""

    model_config = ConfigDict(populate_by_name=True)

    id: int | None  # the adapter version's cluster-unique ID; None for the base model
    served_model: str = Field(serialization_alias="baseModel")  # the base model's served name
    adapter: str | None = None  # namespace/name of the LoRAAdapter


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "loraplane"
    root: str
    parent: str | None = None
    loraplane: LoraplaneModelInfo


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
