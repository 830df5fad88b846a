"""Tenants at the door: limits per adapter and per API key (429 with Retry-After), and who a request is
for (its fair-share flow, weight and priority).

Limits come from two places: an adapter's ``spec.limits`` (the worker's watch keeps ``book`` current,
so an edit applies to the next request, without a restart) and the API key's fields in the key file
(``auth.Key``). Each has three: requests at once (running or queued), prompt + completion tokens per
minute (a token bucket holding one minute of tokens: a request reserves its prompt and its max_tokens
at admission and gets back what it did not generate when it ends), and max_tokens per request (a
request without max_tokens gets the cap; one asking for more gets 400 MaxTokensAboveLimit, since
retrying would never help).

With several replicas an adapter's limits are cluster-wide: each worker enforces its share, the limit
divided by the live workers that have the adapter Ready (the operator's ``status.workers.ready``,
which the watch reads with the spec), rounded up, so N replicas behind a balancer let through about
the limit and never less. A key's limits are per worker: the key file is the same Secret on every
worker of a pool and says nothing of the pool's size (docs/worker.md, "Tenants").

A request with no limits in play costs one dict lookup here: nothing is counted for it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import Counter

from ..inference.fairness import Tenant
from .errors import ApiError

if TYPE_CHECKING:
    from loraplane.crds.models import AdapterLimits

    from .auth import Key

PRIORITY_HEADER = "X-Loraplane-Priority"
MAX_THROTTLED = 256
"""Most adapter IDs reported throttled at once (the newest): the report stays small."""

THROTTLED = Counter(
    "loraplane_worker_throttled_requests",
    "Requests refused with 429 by a limit, by tenant (API-key tenant, '' without), model and limit",
    ["tenant", "model", "limit"],
)
TENANT_REQUESTS = Counter(
    "loraplane_worker_tenant_requests",
    "Requests admitted past the limits, by tenant (API-key tenant, '' without) and priority",
    ["tenant", "priority"],
)
TENANT_TOKENS = Counter(
    "loraplane_worker_tenant_tokens",
    "Prompt + completion tokens of finished requests, by tenant (API-key tenant, '' without)",
    ["tenant"],
)


@dataclass(frozen=True)
class Limits:
    """One adapter's or key's limits on this worker (None: no limit)."""

    max_concurrent_requests: int | None = None
    tokens_per_minute: int | None = None
    max_output_tokens: int | None = None
    weight: int = 1

    @classmethod
    def of_adapter(cls, spec: AdapterLimits | None, replicas: int) -> Limits | None:
        """This worker's share of an adapter's cluster-wide ``spec.limits`` among ``replicas`` workers."""
        if spec is None:
            return None
        n = max(1, replicas)
        return cls(
            max_concurrent_requests=_share(spec.maxConcurrentRequests, n),
            tokens_per_minute=_share(spec.tokensPerMinute, n),
            max_output_tokens=spec.maxOutputTokens,
            weight=spec.weight or 1,
        )

    @classmethod
    def of_key(cls, key: Key) -> Limits:
        return cls(key.max_concurrent_requests, key.tokens_per_minute, key.max_output_tokens, key.weight)

    @property
    def any(self) -> bool:
        return bool(self.max_concurrent_requests or self.tokens_per_minute or self.max_output_tokens)


def _share(limit: int | None, replicas: int) -> int | None:
    return None if limit is None else math.ceil(limit / replicas)


@dataclass
class _Usage:
    """What one adapter or key holds now on this worker."""

    running: int = 0
    level: float = -1.0  # tokens in the bucket; < 0: not filled yet
    stamp: float = 0.0

    def refill(self, per_minute: int, now: float) -> None:
        if self.level < 0:
            self.level = float(per_minute)
        else:
            self.level = min(float(per_minute), self.level + (now - self.stamp) * per_minute / 60.0)
        self.stamp = now


@dataclass
class Ticket:
    """Admission past the limits: ``done(tokens used)`` gives back what it held (once)."""

    holders: list[tuple[_Usage, Limits]]
    reserved: int
    open: bool = True

    def done(self, used: int) -> None:
        if not self.open:
            return
        self.open = False
        unused = max(0, self.reserved - used)
        now = time.monotonic()
        for usage, limits in self.holders:
            usage.running -= 1
            if limits.tokens_per_minute:
                usage.refill(limits.tokens_per_minute, now)
                usage.level = min(float(limits.tokens_per_minute), usage.level + unused)


@dataclass
class Admission:
    """What the limiter decided for one request."""

    tenant: Tenant
    max_tokens: int | None
    """The request's max_tokens, capped by a max_tokens limit when it had none."""
    ticket: Ticket | None = None
    label: str = ""
    """The tenant's metrics label."""


@dataclass
class Limiter:
    """Limits per adapter (``book``: namespace/name -> this worker's share) and per key; the
    ``throttled`` map (adapter ID -> when it last got a 429) feeds the worker's report (LoRAWorker
    status.throttledIds, which the operator turns into the adapter's Throttled condition)."""

    book: dict[str, Limits] = field(default_factory=dict)
    throttled: dict[int, float] = field(default_factory=dict)
    _adapters: dict[str, _Usage] = field(default_factory=dict)
    _keys: dict[str, _Usage] = field(default_factory=dict)
    _counters: dict[tuple[str, bool], Any] = field(default_factory=dict)

    def admit(
        self,
        *,
        adapter: str | None,
        adapter_id: int | None,
        model: str,
        key: Key | None,
        priority: str | None,
        prompt_tokens: int,
        max_tokens: int | None,
        asked: bool,
        room: int,
        choices: int,
    ) -> Admission:
        """Admit one request or raise ApiError 429 (or 400 for a max_tokens above the cap).

        ``adapter``: the LoRAAdapter's namespace/name (None: the base model); ``asked``: the request set
        max_tokens itself (else ``max_tokens`` is the API's default, which a cap lowers); ``room``: the
        most output tokens a choice can get (the length limit less the prompt) when max_tokens is None."""
        tenant_name = key.tenant if key is not None else ""
        batch = (priority or (key.priority if key is not None else "interactive")) == "batch"
        adapter_limits = self.book.get(adapter) if adapter is not None else None
        key_limits = Limits.of_key(key) if key is not None and (key.limited or key.weight != 1) else None
        weight = (adapter_limits.weight if adapter_limits else 1) * (key_limits.weight if key_limits else 1)
        tenant = Tenant(f"{tenant_name}/{model}", float(weight), batch)
        label = tenant_name
        counter = self._counters.get((label, batch))
        if counter is None:  # one labels() lookup per (tenant, priority), not per request
            counter = self._counters[(label, batch)] = TENANT_REQUESTS.labels(
                tenant=label, priority="batch" if batch else "interactive"
            )
        counter.inc()
        in_play = [
            (kind, name, limits)
            for kind, name, limits in (("adapter", adapter, adapter_limits), ("key", tenant_name, key_limits))
            if limits is not None and limits.any
        ]
        if not in_play:
            return Admission(tenant, max_tokens, None, label)
        caps = [(lim.max_output_tokens, kind) for kind, _, lim in in_play if lim.max_output_tokens]
        if caps:
            cap, whose = min(caps)
            if max_tokens is None or (not asked and max_tokens > cap):
                max_tokens = cap
            elif max_tokens > cap:
                raise ApiError(
                    400,
                    "MaxTokensAboveLimit",
                    f"max_tokens {max_tokens} is above the {_whose(whose, adapter, tenant_name)} limit of "
                    f"{cap} output tokens per request (maxOutputTokens); ask for at most {cap}",
                    param="max_tokens",
                    code="invalid_value",
                )
        cost = prompt_tokens + choices * (max_tokens if max_tokens is not None else max(room, 1))
        now = time.monotonic()
        holders: list[tuple[_Usage, Limits]] = []
        for kind, name, limits in in_play:
            usage = (self._adapters if kind == "adapter" else self._keys).setdefault(str(name), _Usage())
            self._check(kind, name, limits, usage, cost, now, model, label, adapter, adapter_id, tenant_name)
            holders.append((usage, limits))
        for usage, limits in holders:  # all passed: take from each
            usage.running += 1
            if limits.tokens_per_minute:
                usage.level -= cost
        return Admission(tenant, max_tokens, Ticket(holders, cost), label)

    def _check(
        self,
        kind: str,
        name: str | None,
        limits: Limits,
        usage: _Usage,
        cost: int,
        now: float,
        model: str,
        label: str,
        adapter: str | None,
        adapter_id: int | None,
        tenant_name: str,
    ) -> None:
        whose = _whose(kind, adapter, tenant_name)
        if limits.max_concurrent_requests and usage.running >= limits.max_concurrent_requests:
            self._refused(kind, adapter_id, model, label, "maxConcurrentRequests")
            raise _too_many(
                f"{usage.running} requests of the {whose} are running, its limit on this worker "
                f"(maxConcurrentRequests) is {limits.max_concurrent_requests}; retry when one finishes",
                1,
            )
        per_minute = limits.tokens_per_minute
        if per_minute:
            if cost > per_minute:
                raise ApiError(
                    400,
                    "RequestAboveTokenLimit",
                    f"this request needs {cost} tokens (prompt + n x max_tokens), more than the {whose} "
                    f"limit of {per_minute} tokens per minute on this worker allows at once; lower max_tokens "
                    "or n, or shorten the prompt",
                    param="max_tokens",
                    code="invalid_value",
                )
            usage.refill(per_minute, now)
            if usage.level < cost:
                wait = math.ceil((cost - usage.level) * 60.0 / per_minute)
                self._refused(kind, adapter_id, model, label, "tokensPerMinute")
                raise _too_many(
                    f"the {whose} used its {per_minute} tokens per minute on this worker (tokensPerMinute); "
                    f"this request needs {cost}; retry in {wait} s",
                    wait,
                )

    def _refused(self, kind: str, adapter_id: int | None, model: str, label: str, limit: str) -> None:
        THROTTLED.labels(tenant=label, model=model, limit=limit).inc()
        if kind == "adapter" and adapter_id is not None:
            self.throttled.pop(adapter_id, None)  # re-inserted last: the dict stays in time order
            self.throttled[adapter_id] = time.monotonic()
            if len(self.throttled) > MAX_THROTTLED:
                del self.throttled[next(iter(self.throttled))]

    def throttled_ids(self, seconds: float) -> set[int]:
        """Adapter IDs that got a 429 within the last ``seconds`` (the report polls it; cheap: the map
        is in time order and at most MAX_THROTTLED long); forgets older ones."""
        cutoff = time.monotonic() - seconds
        while self.throttled and next(iter(self.throttled.values())) < cutoff:
            del self.throttled[next(iter(self.throttled))]
        return set(self.throttled)


def _whose(kind: str, adapter: str | None, tenant: str) -> str:
    return f"adapter {adapter!r}" if kind == "adapter" else f"API key of tenant {tenant!r}"


def _too_many(message: str, retry_after: int) -> ApiError:
    return ApiError(
        429,
        "RateLimited",
        message,
        code="rate_limit_exceeded",
        headers={"Retry-After": str(max(1, retry_after))},
    )


def priority_of(header: str | None) -> str | None:
    """The request's priority header, checked; None when absent."""
    if header is None:
        return None
    value = header.strip().lower()
    if value not in ("interactive", "batch"):
        raise ApiError(
            400,
            "InvalidPriority",
            f"{PRIORITY_HEADER} is {header!r}; send interactive or batch (or leave it out)",
            param=PRIORITY_HEADER,
            code="invalid_value",
        )
    return value
