"""No credential material in the worker's logs, at any level, whoever logs it.

botocore at DEBUG logs every request's headers (the signed ``Authorization`` header carries the
access key id), its canonical request and string to sign; urllib3 logs presigned URLs; HTTP
clients can log bearer tokens; aiohttp's parser errors quote raw header lines in the exception
text. Filters on loggers miss records of child loggers, and handlers come and go (tests,
embedding), so ``install`` wraps the log record factory instead: every record is formatted once at
creation, its traceback and stack too (into ``exc_text``; ``exc_info`` is dropped so no formatter
renders the raw exception again), and scrubbed of the credential values in the environment (AWS
keys, session token, Hub token), of values registered with ``register`` (a token passed as a
setting, the worker's API keys), and of the shapes credentials take in HTTP (Authorization
headers, SigV4 Credential= and Signature=, security tokens, bearer and ``hf_`` tokens, AWS access
key ids).
"""

from __future__ import annotations

import logging
import os
import re
import threading
from typing import Any

MASK = "***"
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
)
_PATTERNS = [
    re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*b?['\"]?)[^'\"\n]+"),
    re.compile(r"(?i)(x-amz-security-token['\"]?\s*[:=]\s*b?['\"]?)[^'\"&\s,}]+"),
    re.compile(r"(?i)(credential=)[^,&\s'\"]+"),
    re.compile(r"(?i)(signature=)[0-9a-f]+"),
    re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/-]+=*"),
    re.compile(r"()\bhf_[A-Za-z0-9]{20,}"),
    re.compile(r"()\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"),
]
_registered: set[str] = set()
_formatter = logging.Formatter()
_lock = threading.Lock()
_installed = False


def register(secret: str | None) -> None:
    """Also mask this value (a token given as a setting rather than through the environment)."""
    if secret and len(secret) >= 4:
        with _lock:
            _registered.add(secret)


def redact(text: str) -> str:
    """``text`` with every known credential value and credential-shaped string masked."""
    values = {v for k in SECRET_ENV if len(v := os.environ.get(k, "")) >= 4} | _registered
    for value in sorted(values, key=len, reverse=True):
        text = text.replace(value, MASK)
    for pattern in _PATTERNS:
        text = pattern.sub(lambda m: m.group(1) + MASK, text)
    return text


def install() -> None:
    """Scrub every log record of the process from now on (idempotent)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
        make = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        if record.exc_info and record.exc_info[0] is not None:
            record.exc_text = redact(_formatter.formatException(record.exc_info))
            record.exc_info = None
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: logging reports it when the record is emitted
            return record
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        return record

    logging.setLogRecordFactory(factory)
