"""Errors that carry a reason code, a message for the user, and whether retrying can help.

The same ``reason`` appears in conditions, Events, logs and the OpenAI ``ErrorResponse.type``,
so code branches on reasons, never on message strings.
"""

from __future__ import annotations


class LoraplaneError(Exception):
    """A failure with a stable reason code (CamelCase, like Kubernetes condition reasons).

    ``retry`` says whether the same input may succeed later (a network blip, a 409) or never will
    (a rank above the maximum). Messages name what is wrong and how to fix it.
    """

    retry: bool = False

    def __init__(self, reason: str, message: str, *, retry: bool | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        if retry is not None:
            self.retry = retry

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class PermanentError(LoraplaneError):
    """The input is wrong; retrying the same input gives the same answer."""

    retry = False


class TemporaryError(LoraplaneError):
    """Something outside us failed (network, API conflict); the same input may succeed later."""

    retry = True

    def __init__(self, reason: str, message: str, *, delay: float = 1.0) -> None:
        super().__init__(reason, message, retry=True)
        self.delay = delay


class ValidationFailed(PermanentError):
    """An adapter that cannot be served; ``problems`` lists every (reason, message) found, not only the first."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        if not problems:
            raise ValueError("ValidationFailed needs at least one problem")
        self.problems = problems
        reason, _ = problems[0]
        super().__init__(reason, "; ".join(message for _, message in problems))
