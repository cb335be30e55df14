"""Who is asking, and whether they may: API keys (the key store's and the environment's), each key's limits, and the
usage row of each request.

Limits, per key, held in this process (one gateway process per store; several would each apply them in full):
- requests per minute and tokens per minute: token buckets that refill continuously (capacity = the limit, refilled
  over a minute). A request needs one request left and its estimate of tokens left (prompt tokens + max tokens ×
  choices); it takes the estimate and gets back what it did not use when it ends. An estimate larger than the
  limit itself is refused as too large (as OpenAI's "Request too large"), whatever is left.
- a budget per UTC day or month, in cost units (weighted prompt and completion tokens, `keystore.Limits`): what the
  period's usage rows spent, plus what running requests reserved, plus the request's own estimated cost, must be
  within it.
A request that set no token limit has its default limit cut to what its key may take (`Access.room`: the tokens per
minute limit, what is left of the budget), so it is answered up to there (finish_reason "length") rather than
refused as too large; one that set its limit is held to it.
- concurrent generations.
Over a limit: 429 with `Retry-After` and the OpenAI error body naming it (`rate_limit_exceeded`, or
`insufficient_quota` for the budget). Answers carry OpenAI's `x-ratelimit-*` headers for the per-minute limits.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from dataclasses import dataclass, field

from app.auth import ApiKeys
from app.errors import APIError
from app.keystore import KeyRecord, KeyStore, Limits, UsageRow, UsageWriter, period_end, period_start


class Bucket:
    """`capacity` units a minute, refilled continuously; the level may go below zero by one taking. Times are the wall
    clock's (the budget periods are calendar ones); a clock set back refills nothing, and the bucket counts on from
    there instead of owing the time it went back."""

    def __init__(self, capacity: int, now: float):
        self.capacity, self.level, self.at = capacity, float(capacity), now

    def refill(self, now: float) -> None:
        self.level = min(float(self.capacity), self.level + max(0.0, now - self.at) * self.capacity / 60.0)
        self.at = now

    def resize(self, capacity: int) -> None:
        self.level = min(self.level, float(capacity)) if capacity < self.capacity else self.level
        self.capacity = capacity

    def seconds_until(self, level: float) -> float:
        return max(0.0, (level - self.level) * 60.0 / self.capacity)


def _duration(seconds: float) -> str:
    """OpenAI's form of a reset time: 20ms, 1s, 6m0s."""
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s" if minutes else f"{rest}s"


@dataclass
class Reservation:
    tokens: int = 0
    cost: float = 0.0


@dataclass
class Tenant:
    """A key's live limit state."""

    record: KeyRecord
    active: int = 0
    requests: Bucket | None = None
    tokens: Bucket | None = None
    spent: float = 0.0  # this budget period's, from the usage rows and the requests settled since
    reserved: float = 0.0  # by running requests
    period: float = 0.0  # when the budget period of `spent` began

    @property
    def limits(self) -> Limits:
        return self.record.limits

    def update(self, record: KeyRecord, now: float) -> None:
        self.record = record
        for name, capacity in (("requests", record.limits.rpm), ("tokens", record.limits.tpm)):
            bucket: Bucket | None = getattr(self, name)
            if capacity is None:
                setattr(self, name, None)
            elif bucket is None:
                setattr(self, name, Bucket(capacity, now))
            else:
                bucket.resize(capacity)

    def admit(self, tokens: int, cost: float, now: float) -> Reservation:
        """Take a request's share, or raise the 429 of the first limit it is over (taking nothing)."""
        limits, key = self.limits, self.record.id
        if limits.max_concurrent is not None and self.active >= limits.max_concurrent:
            raise _limited(f"key {key} has {self.active} generations running, its limit", 1)
        for bucket in (self.requests, self.tokens):
            if bucket is not None:
                bucket.refill(now)
        if self.requests is not None and self.requests.level < 1:
            raise _limited(f"key {key} is over its limit of {self.requests.capacity} requests per minute",
                           self.requests.seconds_until(1))
        if self.tokens is not None and tokens > self.tokens.capacity:
            raise APIError(429, f"request too large for key {key}: up to {tokens} tokens (prompt + max tokens x "
                                f"choices), over its limit of {self.tokens.capacity} tokens per minute; lower "
                                f"max_tokens", None, "rate_limit_exceeded")
        if self.tokens is not None and self.tokens.level < tokens:
            raise _limited(f"key {key} is over its limit of {self.tokens.capacity} tokens per minute (this request: "
                           f"up to {tokens})", self.tokens.seconds_until(tokens))
        # `spent`: Access.admit; the tolerance: a cost cut to fit (Access.room) is not refused for a rounding error
        if limits.budget is not None and self.spent + self.reserved + cost > limits.budget * (1 + 1e-9):
            left = max(0.0, limits.budget - self.spent - self.reserved)
            raise APIError(429, f"key {key} has {left:g} of its budget of {limits.budget:g} for this "
                                f"{limits.budget_period} (UTC) left; this request may cost up to {cost:g}", None,
                           "insufficient_quota", retry_after=math.ceil(period_end(limits.budget_period, now) - now))
        if self.requests is not None:
            self.requests.level -= 1
        if self.tokens is not None:
            self.tokens.level -= tokens
        self.active += 1
        self.reserved += cost
        return Reservation(tokens, cost)

    def settle(self, reservation: Reservation, tokens: int, cost: float, now: float) -> None:
        """A request ended having used `tokens` and `cost`: give back the rest of what it reserved."""
        self.active -= 1
        self.reserved -= reservation.cost
        if period_start(self.limits.budget_period, now) == self.period:
            self.spent += cost
        if self.tokens is not None:
            self.tokens.refill(now)
            self.tokens.level = min(float(self.tokens.capacity), self.tokens.level + reservation.tokens - tokens)

    def headers(self, now: float) -> list[tuple[bytes, bytes]]:
        out = []
        for kind, bucket in (("requests", self.requests), ("tokens", self.tokens)):
            if bucket is None:
                continue
            bucket.refill(now)
            out += [(f"x-ratelimit-limit-{kind}".encode(), str(bucket.capacity).encode()),
                    (f"x-ratelimit-remaining-{kind}".encode(), str(max(0, math.floor(bucket.level))).encode()),
                    (f"x-ratelimit-reset-{kind}".encode(), _duration(bucket.seconds_until(bucket.capacity)).encode())]
        return out


def _limited(message: str, wait: float) -> APIError:
    return APIError(429, f"{message}; retry after {max(1, math.ceil(wait))} s", None, "rate_limit_exceeded",
                    retry_after=max(1, math.ceil(wait)))


@dataclass
class Caller:
    """Who sent a request: `name` is its turn in the admission queue and its tenant for prefix reuse (`key:<id>`,
    or `addr:<ip>` without auth); `tenant` its key's limits (None: none apply)."""

    name: str
    key_id: str = ""
    tenant: Tenant | None = None
    endpoint: str = ""
    reservation: Reservation | None = field(default=None, repr=False)


class Access:
    """The gateway's keys (store + environment), their tenants and the usage writer. Auth is on when the environment
    lists keys or the store holds any (revoked ones count). Without a store (`db` None) only the environment's keys
    exist and nothing is metered; nor is anything between `close` and `open`."""

    def __init__(self, env_keys: ApiKeys, store: KeyStore | None = None):
        self.env_keys, self.store = env_keys, store
        self.writer: UsageWriter | None = None  # from `open` to `close` (the app's lifespan)
        self._tenants: dict[str, Tenant] = {}
        self._store_has_keys = False
        self.refresh()

    @property
    def enabled(self) -> bool:
        return bool(self.env_keys) or self._store_has_keys

    def refresh(self) -> None:
        """Pick up keys, revocations and limits another process committed (cheap when none did)."""
        if self.store is None or not self.store.changed():
            return
        self._store_has_keys = self.store.has_keys()
        now = time.time()
        for key_id, tenant in list(self._tenants.items()):
            record = self.store.get(key_id)
            if record is None or record.revoked is not None:
                del self._tenants[key_id]
            else:
                tenant.update(record, now)

    def authenticate(self, token: bytes, address: str) -> Caller | None:
        """The caller presenting `token` (an address's caller when auth is off); None: refused (401)."""
        self.refresh()
        if not self.enabled:
            return Caller("addr:" + address)
        text = token.decode("utf-8", "replace")
        if self.store is not None and (record := self.store.verify(text)) is not None:
            tenant = self._tenants.get(record.id)
            if tenant is None:
                tenant = self._tenants[record.id] = Tenant(record)
                tenant.update(record, time.time())
            return Caller("key:" + record.id, record.id, tenant)
        if self.env_keys.accepts(token):
            key_id = "env-" + hashlib.sha256(token).hexdigest()[:12]
            return Caller("key:" + key_id, key_id)
        return None

    def admit(self, caller: Caller, tokens: int, prompt_tokens: int, completion_tokens: int) -> None:
        """Hold `caller`'s share of its key's limits for a request estimated at these counts (429 when over one)."""
        tenant = caller.tenant
        if tenant is None:
            return
        now = time.time()
        self._current(tenant, now)
        caller.reservation = tenant.admit(tokens, tenant.limits.cost(prompt_tokens, completion_tokens), now)

    def room(self, caller: Caller, prompt_tokens: int) -> int | None:
        """The completion tokens a request of `prompt_tokens` may take at most under its key's tokens per minute (the
        limit itself: what is left now decides whether it waits, with its Retry-After) and budget (what is left of
        it); None: no such limit. Not a reservation."""
        tenant = caller.tenant
        if tenant is None:
            return None
        now = time.time()
        self._current(tenant, now)
        limits, rooms = tenant.limits, list[float]()
        if tenant.tokens is not None:
            rooms.append(tenant.tokens.capacity - prompt_tokens)
        if limits.budget is not None and limits.completion_weight > 0:
            left = limits.budget - tenant.spent - tenant.reserved - limits.cost(prompt_tokens, 0)
            rooms.append(left / limits.completion_weight * (1 - 1e-9))  # rounding never puts it over
        return max(0, math.floor(min(rooms))) if rooms else None

    def _current(self, tenant: Tenant, now: float) -> None:
        """The tenant's budget period is the present one (its spending read from the store at a new period)."""
        limits = tenant.limits
        if limits.budget is not None and tenant.period != (start := period_start(limits.budget_period, now)):
            tenant.spent = self.store.spent(tenant.record.id, start) if self.store is not None else 0.0
            tenant.period = start

    def finish(self, caller: Caller, row: UsageRow) -> asyncio.Future[None] | None:
        """Settle the caller's reservation and write the request's usage row; the future is done once it is
        committed (None: nothing is metered)."""
        if caller.tenant is not None and caller.reservation is not None:
            caller.tenant.settle(caller.reservation, row.prompt_tokens + row.completion_tokens, row.cost, row.at)
            caller.reservation = None
        if self.writer is None:
            return None
        return asyncio.wrap_future(self.writer.record(row))

    def cost(self, caller: Caller, prompt_tokens: int, completion_tokens: int) -> float:
        limits = caller.tenant.limits if caller.tenant is not None else Limits()
        return limits.cost(prompt_tokens, completion_tokens)

    def open(self) -> None:
        if self.store is not None and self.writer is None:
            self.writer = UsageWriter(self.store.path)

    def close(self) -> None:
        """Write the usage rows still queued, and stop the writer (the store stays open: `open` may follow)."""
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()
