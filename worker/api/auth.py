"""API keys: who may call the OpenAI API and /adapters.

Keys come from ``--api-keys`` / ``LORAPLANE_API_KEYS`` (comma-separated) and from ``--api-key-file``
(one key per line, ``#`` comments; the chart mounts a Secret there). Several keys are accepted at
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

from loraplane.worker import redaction

log = logging.getLogger(__name__)

_KEY = re.compile(r"[\x21-\x7e]{8,512}")  # printable ASCII without spaces: what a header carries
RELOAD_EVERY_S = 1.0
MAX_FILE_BYTES = 1 << 20


class ApiKeyError(ValueError):
    """A key or key file that cannot work; the message names where it came from."""


def parse(text: str, where: str) -> tuple[str, ...]:
    """Keys from a key file's text: one per line, blank lines and ``#`` comments skipped."""
    keys = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(check(line, f"{where} line {n}"))
    return tuple(keys)


def check(key: str, where: str) -> str:
    if not _KEY.fullmatch(key):
        raise ApiKeyError(f"{where}: an API key must be 8 to 512 printable ASCII characters without spaces")
    redaction.register(key)
    return key


class ApiKeys:
    """The accepted keys: fixed ones plus a key file's current contents. Empty: no authentication."""

    def __init__(self, keys: Iterable[str] = (), file: str = "") -> None:
        self.fixed = tuple(check(k, "--api-keys") for k in keys)
        self.file = file
        self._from_file: tuple[str, ...] = ()
        self._stamp: tuple[int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        if file:
            self._reload(strict=True)

    @property
    def enabled(self) -> bool:
        return bool(self.fixed or self.file)

    def keys(self) -> tuple[str, ...]:
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
        scheme, _, token = authorization.partition(" ")
        try:
            given = token.strip().encode("ascii")  # keys are ASCII; other bytes cannot match any
        except UnicodeEncodeError:
            return False
        ok = False
        for key in self.keys():
            ok |= hmac.compare_digest(given, key.encode())
        return ok and scheme.lower() == "bearer"

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
