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


# ---- Kubernetes API errors --------------------------------------------------------------------------
# One class per status that callers branch on (kopf's habit). Each keeps the Kubernetes Status the
# server sent: ``status`` (the HTTP code; 0 when the server was not reached), ``reason`` (the Status
# reason, e.g. ``Conflict``), ``message`` and ``details``; ``retry`` says whether trying again can help.


class APIError(LoraplaneError):
    """A Kubernetes API request failed, e.g. ``NotFound: loraadapters "a" not found``."""

    default_reason = "InternalError"

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        details: dict | None = None,
        *,
        retry: bool | None = None,
    ) -> None:
        super().__init__(reason or self.default_reason, message, retry=retry)
        self.status = status
        self.details = details or {}


class APIUnreachableError(APIError):
    """The API server could not be reached or the connection broke: ``ApiUnreachable: GET /api/v1/...``."""

    retry = True
    default_reason = "ApiUnreachable"


class CredentialsError(APIError):
    """No usable credentials: ``NoCredentials: cannot load Kubernetes credentials from /x: ...``."""

    default_reason = "NoCredentials"


class APIClientError(APIError):
    """Any 4xx answer."""

    default_reason = "BadRequest"


class APIUnauthorizedError(APIClientError):
    default_reason = "Unauthorized"


class APIForbiddenError(APIClientError):
    default_reason = "Forbidden"


class APINotFoundError(APIClientError):
    default_reason = "NotFound"


class APIConflictError(APIClientError):
    """409: a stale resourceVersion (``Conflict``) or a name in use (``AlreadyExists``): re-read and retry."""

    retry = True
    default_reason = "Conflict"


class APIGoneError(APIClientError):
    """410: a resourceVersion older than the server keeps (``Expired``): list again."""

    retry = True
    default_reason = "Expired"


class APIUnprocessableEntityError(APIClientError):
    default_reason = "Invalid"


class APITooManyRequestsError(APIClientError):
    retry = True
    default_reason = "TooManyRequests"


class APIServerError(APIError):
    """Any 5xx answer: the server's trouble, worth retrying."""

    retry = True


class APIResourceVersionTooLargeError(APIServerError):
    """504 ``ResourceVersionTooLarge``: a resourceVersion the server has not reached (it restarted from
    an older or empty store); list again instead of resuming."""
