"""How one request samples and when it stops: the fields every engine implements, checked once.

The HTTP layer builds ``SamplingParams`` from an OpenAI request; both engines take it (the built-in one
samples with it in ``builtin/sampling.py``, vLLM's engine translates it into vLLM's own). No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass

from loraplane.errors import PermanentError

MAX_STOP_SEQUENCES = 8
MAX_STOP_CHARS = 256
#: the ranges torch takes (a seed outside them raised inside the engine's admission: issue 11)
INT32_MAX = 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops (the OpenAI request fields, checked)."""

    max_tokens: int | None = 16  # None: up to the model's (or adapter's) length limit
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no top-k
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        problems = [
            (self.max_tokens is not None and self.max_tokens < 1, "max_tokens must be at least 1"),
            (not 0.0 <= self.temperature <= 2.0, "temperature must be between 0 and 2"),
            (not 0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (
                not -1 <= self.top_k <= INT32_MAX,
                f"top_k must be -1 (off) or a positive number up to {INT32_MAX}",
            ),
            (
                self.seed is not None and not INT64_MIN <= self.seed <= INT64_MAX,
                f"seed must be a 64-bit signed integer ({INT64_MIN} to {INT64_MAX})",
            ),
            (
                any(not 0 <= t <= INT32_MAX for t in self.stop_token_ids),
                f"stop_token_ids must be between 0 and {INT32_MAX}",
            ),
            (len(self.stop) > MAX_STOP_SEQUENCES, f"at most {MAX_STOP_SEQUENCES} stop sequences"),
            (any(not s for s in self.stop), "stop sequences must not be empty"),
            (
                any(len(s) > MAX_STOP_CHARS for s in self.stop),
                f"stop sequences are at most {MAX_STOP_CHARS} characters",
            ),
        ]
        bad = [msg for wrong, msg in problems if wrong]
        if bad:
            raise PermanentError("InvalidSamplingParams", "; ".join(bad))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
