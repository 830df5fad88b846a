"""Served-name ownership: per base model, the oldest claimant of a served name keeps it.

Order is (creationTimestamp, namespace, name): RFC 3339 timestamps sort as strings, and ties (one-second
resolution) fall back to namespace/name, so every replica picks the same holder from the same objects.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Claim:
    created: str
    namespace: str
    name: str

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


Key = tuple[str, str]  # (baseModel, served name)


class NameIndex:
    """Who claims which served name; ``holder`` answers who has it."""

    def __init__(self) -> None:
        self._claims: dict[Key, set[Claim]] = {}
        self._by_ref: dict[str, tuple[Key, Claim]] = {}
        self.journal: set[Key] | None = None
        """Keys whose holder may have changed since its reader last emptied it; None (nobody reads it,
        so nothing is kept) until a reader sets a set. Body-based routing (bbr.py) recomputes only these."""

    def claim(self, key: Key, claim: Claim) -> set[Key]:
        """Record (or move) a claim; returns the keys whose holder may have changed."""
        touched = self.release(claim.ref)
        self._claims.setdefault(key, set()).add(claim)
        self._by_ref[claim.ref] = (key, claim)
        if self.journal is not None:
            self.journal.add(key)
        return touched | {key}

    def release(self, ref: str) -> set[Key]:
        old = self._by_ref.pop(ref, None)
        if old is None:
            return set()
        key, claim = old
        claims = self._claims.get(key, set())
        claims.discard(claim)
        if not claims:
            self._claims.pop(key, None)
        if self.journal is not None:
            self.journal.add(key)
        return {key}

    def holder(self, key: Key) -> Claim | None:
        claims = self._claims.get(key)
        return min(claims) if claims else None

    def claimants(self, key: Key) -> list[Claim]:
        return sorted(self._claims.get(key, ()))

    def holders(self) -> list[tuple[Key, Claim]]:
        """Every claimed name with its holder (what body-based routing publishes)."""
        return [(key, min(claims)) for key, claims in list(self._claims.items()) if claims]
