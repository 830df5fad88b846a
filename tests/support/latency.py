"""Time to first token, as a client sees it: what the fair-share tests on both engines measure."""

from __future__ import annotations

import time
from collections.abc import Sequence

import openai


def ttft(client: openai.OpenAI, model: str, prompt: str | Sequence[int]) -> float:
    """Seconds from sending a 2-token streamed completion to its first chunk."""
    start = time.monotonic()
    stream = client.completions.create(
        model=model, prompt=prompt, max_tokens=2, temperature=0, stream=True, extra_body={"ignore_eos": True}
    )
    for _ in stream:
        took = time.monotonic() - start
        stream.close()
        return took
    raise AssertionError(f"{model}: the stream ended without a chunk")
