"""The error every API answer carries when it fails: ``ApiError`` and OpenAI's error shape.

Kept apart from the request models so the probe and auth side of the server imports no engine (a
control-mode worker serves /health, /ready, /metrics and /adapters without torch).
"""

from __future__ import annotations

from pydantic import BaseModel

from loraplane.errors import LoraplaneError, TemporaryError

# reason -> (HTTP status, OpenAI-style code)
_STATUS: dict[str, tuple[int, str]] = {
    "QueueFull": (429, "rate_limit_exceeded"),
    "PromptTooLong": (400, "context_length_exceeded"),
    "ShuttingDown": (503, "unavailable"),
    "EngineLoading": (503, "unavailable"),
    "EngineError": (500, "internal_error"),
}


class ErrorInfo(BaseModel):
    message: str
    type: str  # the loraplane reason code (the same one logs and conditions use)
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class ApiError(Exception):
    """An error response: status, reason code (the ``type``), message, and optional param/code/headers."""

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.reason, self.message = status, reason, message
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> ErrorResponse:
        return ErrorResponse(
            error=ErrorInfo(message=self.message, type=self.reason, param=self.param, code=self.code)
        )

    @classmethod
    def of(cls, exc: LoraplaneError, *, param: str | None = None) -> ApiError:
        status, code = _STATUS.get(exc.reason, (503 if exc.retry else 400, "invalid_value"))
        headers = {}
        if isinstance(exc, TemporaryError):
            headers["Retry-After"] = str(max(1, round(exc.delay)))
        return cls(status, exc.reason, exc.message, param=param, code=code, headers=headers)
