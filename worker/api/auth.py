"""API keys: who may call the OpenAI API and /adapters.

Keys come from ``--api-keys`` / ``LORAPLANE_API_KEYS`` (comma-separated) and from ``--api-key-file``
(one key per line, ``#`` comments; the chart mounts a Secret there). A key file line may follow the key
with ``name=value`` fields that make the key a tenant (docs/worker.md, "Tenants"):
``tenant=acme weight=2 priority=batch max-concurrent-requests=8 tokens-per-minute=60000
max-output-tokens=512``; a plain key is the tenant named by its position, weight 1, interactive. Several keys are accepted at
once so a key can be rotated: add the new one, move clients, remove the old one. The file is re-read
when it changes (Kubernetes updates a mounted Secret in place), so rotation needs no restart. Every
key is compared in constant time (``hmac.compare_digest``), always against all keys, so timing says
nothing about how much of a guess matched or which key it was close to. Every key is registered with
``redaction``, so no log line shows one, whatever logged it (aiohttp's parser errors quote raw header
lines). A key file over ``MAX_FILE_BYTES`` is refused whole (a key cut at the limit would be accepted
by its prefix), and a file without keys, while no fixed key is set, is a readiness problem: every
request would be refused.
"""

from __future__ import annotations

import hmac
import logging
import os
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from loraplane.worker import redaction

log = logging.getLogger(__name__)

_KEY = re.compile(r"[\x21-\x7e]{8,512}")  # printable ASCII without spaces: what a header carries
RELOAD_EVERY_S = 1.0
MAX_FILE_BYTES = 1 << 20


class ApiKeyError(ValueError):
    """A key or key file that cannot work; the message names where it came from."""


TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
PRIORITIES = ("interactive", "batch")


@dataclass(frozen=True)
class Key:
    """An accepted key and the tenant it stands for (its fields from the key file)."""

    value: str
    tenant: str = ""
    """The tenant name in metrics and fair share; empty: no tenant (fair share by adapter only)."""
    weight: int = 1
    """Share of a saturated worker relative to other keys."""
    priority: str = "interactive"
    """Its requests' priority unless the request says otherwise (header ``X-Loraplane-Priority``)."""
    max_concurrent_requests: int | None = None
    tokens_per_minute: int | None = None
    max_output_tokens: int | None = None

    @property
    def limited(self) -> bool:
        return bool(self.max_concurrent_requests or self.tokens_per_minute or self.max_output_tokens)


_INT_FIELDS = {
    "weight": (1, 1000),
    "max-concurrent-requests": (1, 1_000_000),
    "tokens-per-minute": (1, 10**12),
    "max-output-tokens": (1, 2**31 - 1),
}


def parse(text: str, where: str) -> tuple[Key, ...]:
    """Keys from a key file's text: one per line (the key, then optional ``name=value`` fields), blank
    lines and ``#`` comments skipped."""
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            value, *fields = line.split()
            keys.append(_key(check(value, f"{where} line {n}"), fields, f"{where} line {n}"))
    return tuple(keys)


def _key(value: str, fields: list[str], where: str) -> Key:
    """A key with its tenant fields; an unknown field or a bad value is refused by name."""
    values: dict[str, object] = {}
    for item in fields:
        name, eq, raw = item.partition("=")
        if not eq or name in values:
            raise ApiKeyError(f"{where}: {item!r} is not a name=value field (or repeats one)")
        if name == "tenant":
            if not TENANT_NAME.fullmatch(raw):
                raise ApiKeyError(f"{where}: tenant must be 1-63 letters, digits, '.', '_' or '-'")
            values[name] = raw
        elif name == "priority":
            if raw not in PRIORITIES:
                raise ApiKeyError(f"{where}: priority must be one of {', '.join(PRIORITIES)}")
            values[name] = raw
        elif name in _INT_FIELDS:
            low, high = _INT_FIELDS[name]
            if not raw.isdigit() or not low <= int(raw) <= high:
                raise ApiKeyError(f"{where}: {name} must be an integer from {low} to {high}")
            values[name] = int(raw)
        else:
            known = ", ".join(["tenant", "priority", *_INT_FIELDS])
            raise ApiKeyError(f"{where}: unknown field {name!r}; a key line takes {known}")
    return Key(value, **{k.replace("-", "_"): v for k, v in values.items()})  # type: ignore[arg-type]


def check(key: str, where: str) -> str:
    if not _KEY.fullmatch(key):
        raise ApiKeyError(f"{where}: an API key must be 8 to 512 printable ASCII characters without spaces")
    redaction.register(key)
    return key


class ApiKeys:
    """The accepted keys: fixed ones plus a key file's current contents. Empty: no authentication."""

    def __init__(self, keys: Iterable[str] = (), file: str = "") -> None:
        self.fixed = tuple(Key(check(k, "--api-keys")) for k in keys)
        self.file = file
        self._from_file: tuple[Key, ...] = ()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if file:
            self._reload(strict=True)

    @property
    def enabled(self) -> bool:
        return bool(self.fixed or self.file)

    def keys(self) -> tuple[Key, ...]:
        if self.file and time.monotonic() - self._checked >= RELOAD_EVERY_S:
            self._reload(strict=False)
        return self.fixed + self._from_file

    def problem(self) -> str | None:
        """Why no request can pass (a readiness check), or None."""
        if self.file and not self.keys():
            return f"the API key file {self.file} holds no keys (and --api-keys is empty): every request gets 401"
        return None

    def allows(self, authorization: str) -> bool:
        """Whether an ``Authorization`` header value carries an accepted key (``Bearer <key>``)."""
        return self.match(authorization) is not None

    def match(self, authorization: str) -> Key | None:
        """The accepted key an ``Authorization`` header value carries (``Bearer <key>``), or None."""
        scheme, _, token = authorization.partition(" ")
        try:
            given = token.strip().encode("ascii")  # keys are ASCII; other bytes cannot match any
        except UnicodeEncodeError:
            return None
        found: Key | None = None
        for key in self.keys():  # every key compared, whichever matches: timing tells nothing
            if hmac.compare_digest(given, key.value.encode()):
                found = key
        return found if scheme.lower() == "bearer" else None

    def _reload(self, *, strict: bool) -> None:
        with self._lock:
            self._checked = time.monotonic()
            try:
                st = os.stat(self.file)
                stamp = (st.st_mtime_ns, st.st_size)
                if stamp == self._stamp:
                    return
                with open(self.file, "rb") as f:
                    data = f.read(MAX_FILE_BYTES + 1)
                if len(data) > MAX_FILE_BYTES:
                    raise ApiKeyError(
                        f"--api-key-file {self.file}: over {MAX_FILE_BYTES} bytes; "
                        "a key file holds one short key per line"
                    )
                keys = parse(data.decode("utf-8"), f"--api-key-file {self.file}")
            except (OSError, UnicodeDecodeError, ApiKeyError) as exc:
                if strict:
                    why = exc.strerror if isinstance(exc, OSError) else exc
                    raise ApiKeyError(
                        f"--api-key-file {self.file}: {why}" if not isinstance(exc, ApiKeyError) else str(exc)
                    ) from None
                # Keep the keys we had: a Secret being replaced must not lock every client out.
                log.warning(
                    "API key file %s not reloaded (keeping %d keys): %s", self.file, len(self._from_file), exc
                )
                return
            if not keys and not self.fixed:
                log.warning(
                    "API key file %s holds no keys: every request gets 401 until keys are added", self.file
                )
            elif keys != self._from_file:
                log.info("API key file %s: %d keys", self.file, len(keys))
            self._from_file, self._stamp = keys, stamp
