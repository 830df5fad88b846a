"""vLLM's own tool parsers for ``tool_choice: "auto"`` on a vLLM pool (``--tool-call-parser NAME``).

The parser classes are vLLM's (``vllm.tool_parsers.ToolParserManager``: hermes, llama3_json,
pythonic, mistral, ...), driven through their stable ``ToolParser`` interface exactly as ``vllm serve
--enable-auto-tool-choice --tool-call-parser NAME`` drives them: ``extract_tool_calls`` for a whole
answer, ``extract_tool_calls_streaming`` per delta, one parser instance per choice (they keep state).
Results go back as plain dicts in OpenAI's shape (``api/tools.py`` validates them into its models).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from loraplane.errors import PermanentError


class ToolParsers:
    """The pool's parser class, checked at start; ``for_request`` makes per-choice parsers."""

    def __init__(self, name: str, tokenizer: Any) -> None:
        from vllm.tool_parsers import ToolParserManager

        try:
            self.cls = ToolParserManager.get_tool_parser(name)
        except (KeyError, ImportError) as e:
            known = ", ".join(ToolParserManager.list_registered())
            raise PermanentError(
                "InvalidSettings", f"--tool-call-parser {name!r}: {e}; vLLM has: {known}"
            ) from None
        self.name = name
        self.tokenizer = tokenizer
        self.cls(tokenizer, None)  # fails now, not at the first request, if the tokenizer lacks its tokens

    def for_request(self, request: Any) -> Callable[[], _Session]:
        """A factory of parsers (one per choice) for one chat request (loraplane's model of it)."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

        # The fields the parsers read (tools, tool_choice); vLLM's own model of them, validated by vLLM.
        vreq = ChatCompletionRequest.model_validate(
            {
                "model": request.model,
                "messages": [{"role": "user", "content": ""}],
                "tools": [t.model_dump(exclude_none=True) for t in request.tools or []],
                "tool_choice": "auto",
            }
        )
        return lambda: _Session(self.cls(self.tokenizer, vreq.tools), vreq)


class _Session:
    """One choice's parser and the text and tokens it has seen (what the streaming call needs)."""

    def __init__(self, parser: Any, request: Any) -> None:
        self.parser, self.request = parser, request
        self.text = ""
        self.token_ids: list[int] = []

    def whole(self, text: str) -> tuple[str | None, list[dict[str, Any]]]:
        info = self.parser.extract_tool_calls(text, self.request)
        if not info.tools_called:
            return text, []
        return info.content, [c.model_dump(exclude_none=True) for c in info.tool_calls]

    def delta(self, text: str, token_ids: list[int], finished: bool) -> dict[str, Any] | None:
        previous_text, previous_ids = self.text, self.token_ids
        self.text, self.token_ids = previous_text + text, previous_ids + token_ids
        d = None
        if text or token_ids:
            d = self.parser.extract_tool_calls_streaming(
                previous_text, self.text, text, previous_ids, self.token_ids, token_ids, self.request
            )
        out = {} if d is None else d.model_dump(exclude_none=True)
        if finished:
            # As vLLM's server at the end of a stream: arguments the parser holds back (it streams
            # them only once sure they are complete) go out with the last chunk.
            rest = self.parser.get_remaining_unstreamed_args() if self.parser.prev_tool_call_arr else ""
            if rest:
                index = len(self.parser.prev_tool_call_arr) - 1
                out.setdefault("tool_calls", []).append({"index": index, "function": {"arguments": rest}})
        return out or None
