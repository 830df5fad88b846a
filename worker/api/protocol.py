"""The OpenAI wire format: pydantic request and response models, and the error shape.

Request models own their conversion to the engine's ``SamplingParams`` and to prompt token IDs,
so routes stay thin. Fields we do not implement (n > 1, logprobs, echo, tools) are refused with a
400 that names them rather than silently ignored; unknown extra fields are ignored, as OpenAI does.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from loraplane.crds.errors import PermanentError

from ..engine.sampling import SamplingParams


class ErrorInfo(BaseModel):
    message: str
    type: str  # the loraplane reason code (the same one logs and conditions use)
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    """Fields completions and chat share."""

    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: Any = None
    ignore_eos: bool = False
    user: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, message) for each field set to something we do not implement."""
        found = []
        if self.n != 1:
            found.append(("n", "only n=1 is supported; send several requests instead"))
        if self.logprobs not in (None, False, 0):
            found.append(("logprobs", "logprobs are not supported"))
        return found

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


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool = False
    suffix: str | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.echo:
            found.append(("echo", "echo is not supported"))
        if self.suffix:
            found.append(("suffix", "suffix is not supported"))
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], (str, list)):
            if len(self.prompt) != 1:
                found.append(("prompt", "one prompt per request; send a batch as separate requests"))
        return found

    def to_sampling_params(self) -> SamplingParams:
        return self.sampling_params(16 if self.max_tokens is None else self.max_tokens)  # OpenAI's default

    def prompt_ids(self, tokenizer: Any) -> list[int]:
        prompt: Any = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return list(tokenizer.encode(prompt))
        return [int(t) for t in prompt]


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None

    def unsupported(self) -> list[tuple[str, str]]:
        found = super().unsupported()
        if self.tools:
            found.append(("tools", "tools are not supported"))
        return found

    def to_sampling_params(self) -> SamplingParams:
        # No max given: up to the length limit (the scheduler stops there with finish_reason "length").
        return self.sampling_params(self.max_completion_tokens or self.max_tokens)

    def prompt_ids(self, tokenizer: Any) -> list[int]:
        if not getattr(tokenizer, "chat_template", None):
            raise PermanentError(
                "ChatTemplateMissing",
                "this base model's tokenizer has no chat template; use /v1/completions with a prompt",
            )
        messages = [{"role": m.role, "content": m.text()} for m in self.messages]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer.encode(text, add_special_tokens=False))


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


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None = None
    logprobs: None = None


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


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


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
    base_model: str = Field(serialization_alias="baseModel")
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
