"""Who is calling and what they may do: authentication, per-key policy and limits.

Plain code (no Ray, no HTTP), one `Access` per ingress replica:

- `authenticate(token, client)` turns an API key into a `Principal` (401 `Unauthenticated`
  otherwise). Keys are read from the `KeyStore` into memory and reread every `refresh_s`, so a
  check is one HMAC and a constant-time compare; a client address with too many failures in a
  window is refused before its keys are checked (429 `too_many_failed_authentications`).
- `admit(principal, model)` checks the key's tiers and its limits and returns a `Lease`: the
  request's place among the key's concurrent requests, given back by `Lease.end` with the
  tokens and cost it spent. Requests and tokens per minute are token buckets; a budget counts
  the period's spending from the store (every replica's) plus this replica's not yet recorded.

With several ingress replicas, per-minute limits and concurrency are each replica's share
(the limit over the replicas Serve runs, `replicas_seen`): Serve spreads requests over the
replicas, so together they hold the key near its limit. Budgets are shared through the store
and may be overshot by what the replicas spend within one `refresh_s`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from tierserve.core.errors import PermissionDenied, QuotaExceeded, RateLimited, Unauthenticated
from tierserve.router.config import AuthConfig
from tierserve.router.keys import ApiKey, KeyPolicy, KeyStore, matches, parse_token, period_of

logger = logging.getLogger("tierserve.auth")


@dataclass(frozen=True)
class Principal:
    """The caller of one request: a key's id, name and policy. `ANONYMOUS` when auth is off."""

    key_id: str | None
    name: str
    policy: KeyPolicy

    def may_use(self, model: str) -> bool:
        return self.policy.may_use(model)

    def may_read(self, index: str) -> bool:
        return self.key_id is None or self.policy.may_read(index)

    @property
    def admin(self) -> bool:
        return self.key_id is None or self.policy.admin

    def require_admin(self, what: str) -> None:
        if not self.admin:
            raise PermissionDenied(f"{what} needs an API key with the admin scope", None, "admin_required")


ANONYMOUS = Principal(None, "anonymous", KeyPolicy())
"""The caller when auth is off: every tier and index, no limits."""


class TokenBucket:
    """`capacity` tokens, refilled at `rate` per second; may go negative (spent after the fact)."""

    __slots__ = ("capacity", "rate", "level", "stamp")

    def __init__(self, capacity: float, rate: float, now: float):
        self.capacity, self.rate, self.level, self.stamp = capacity, rate, capacity, now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, need: float, now: float) -> float:
        """Seconds until `need` tokens are there (0: now)."""
        self.refill(now)
        return 0.0 if self.level >= need else (need - self.level) / self.rate


@dataclass
class _KeyState:
    """One key's live counters on this replica."""

    requests: TokenBucket | None = None
    tokens: TokenBucket | None = None
    in_flight: int = 0
    shape: tuple = ()
    """The limits the buckets were made for (remade when the policy or the replica count changes)."""


@dataclass
class Lease:
    """One admitted request's hold on its key's limits; `end` gives it back once, with what it spent."""

    access: Access | None
    principal: Principal
    ended: bool = False

    def end(self, tokens: int = 0, cost: float = 0.0) -> None:
        if self.ended or self.access is None:
            return
        self.ended = True
        self.access._ended(self.principal, tokens, cost)


@dataclass
class _Failures:
    count: int = 0
    since: float = field(default_factory=time.monotonic)


class Access:
    """Authentication and per-key limits for one ingress replica (see the module docstring)."""

    def __init__(
        self,
        config: AuthConfig,
        store: KeyStore | None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        if config.enabled and store is None:
            raise ValueError("auth is enabled but no key store was given")
        self.config = config
        self.store = store
        self.clock, self.wall = clock, wall
        self.replicas = 1
        """Ingress replicas Serve runs: per-minute limits and concurrency are split among them."""
        self._keys: dict[str, ApiKey] = {}
        self._loaded = -math.inf
        self._state: dict[str, _KeyState] = {}
        self._failures: OrderedDict[str, _Failures] = OrderedDict()
        self._spent: dict[tuple[str, str], tuple[int, float]] = {}
        """Spending not yet in the store: {(key id, period): (tokens, cost)}."""
        self._flushing: dict[tuple[str, str], tuple[int, float]] = {}
        """Spending being written to the store now."""
        self._used: dict[str, tuple[int, float]] = {}
        """Each budgeted key's spending this period, as the store last said (every replica's)."""
        self._refreshing: asyncio.Lock | None = None
        if store is not None:
            self.reload()

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    # ----- the store ---------------------------------------------------------------------
    # The store's I/O runs in a thread (`_exchange`); what it reads and what it could not write
    # are taken in and given back on the event loop (`_begin`, `_end`), where requests change
    # the spending, so no request's charge is lost or counted twice.

    def reload(self) -> None:
        """Record this replica's spending in the store and read the keys and budgets back."""
        spent = self._begin()
        self._end(spent, *self._exchange(spent))

    async def refresh(self) -> None:
        """`reload` when `refresh_s` has passed, its I/O in a thread; one at a time."""
        if self.store is None or self.clock() - self._loaded < self.config.refresh_s:
            return
        if self._refreshing is None:
            self._refreshing = asyncio.Lock()
        if self._refreshing.locked():
            return
        async with self._refreshing:
            spent = self._begin()
            self._end(spent, *await asyncio.to_thread(self._exchange, spent))

    def _begin(self) -> dict[tuple[str, str], tuple[int, float]]:
        spent, self._spent = self._spent, {}
        self._flushing = spent  # still counted by budgets until the store's total includes it
        return spent

    def _exchange(
        self, spent: dict[tuple[str, str], tuple[int, float]]
    ) -> tuple[bool, dict[str, ApiKey] | None, dict[str, tuple[int, float]] | None]:
        """Write `spent`, read the keys and this period's spending; each part may fail alone."""
        assert self.store is not None
        recorded = True
        try:
            self.store.record(spent)
        except Exception:
            recorded = False
            logger.exception("recording spending in the key store %s failed; kept for the next try", self.store.path)
        try:
            keys = self.store.keys()
            now = self.wall()
            budgeted = {k.id: period_of(k.policy.budget, now)[0] for k in keys.values() if k.policy.budget is not None}
            return recorded, keys, self.store.usage(budgeted)
        except Exception:
            logger.exception("reading the key store %s failed; using the keys read before", self.store.path)
            return recorded, None, None

    def _end(
        self,
        spent: dict[tuple[str, str], tuple[int, float]],
        recorded: bool,
        keys: dict[str, ApiKey] | None,
        used: dict[str, tuple[int, float]] | None,
    ) -> None:
        self._flushing = {}
        if not recorded:
            _add(self._spent, spent)  # nothing is lost: written with the next refresh
        if keys is not None and used is not None:
            self._keys, self._used = keys, used
        elif recorded:  # in the store now, but not yet in the total last read
            for (key_id, _), (t, c) in spent.items():
                t0, c0 = self._used.get(key_id, (0, 0.0))
                self._used[key_id] = (t0 + t, c0 + c)
        self._loaded = self.clock()

    # ----- authentication ----------------------------------------------------------------

    def authenticate(self, token: str | None, client: str = "") -> Principal:
        """The key's principal, else 401; past `auth.failed.max_failures` failures from the
        client's address in a window, its failures are answered 429 with `Retry-After`. A valid
        key is let in from any address: a flood of bad keys from behind a shared address (a load
        balancer, every handle caller) locks out no one."""
        if not self.enabled:
            return ANONYMOUS
        parsed = parse_token(token) if token else None
        key = self._keys.get(parsed[0]) if parsed else None
        secret = self.store.server_secret if self.store is not None else b""
        if key is not None and key.revoked is None and parsed is not None and matches(key, secret, parsed[1]):
            return Principal(key.id, key.name, key.policy)
        self._throttled(client)
        self._failed(client)
        if not token:
            raise Unauthenticated(
                "no API key: send it as `Authorization: Bearer <key>` (the OpenAI SDK's api_key)",
                None,
                "missing_api_key",
            )
        raise Unauthenticated("the API key is not valid (unknown, revoked or malformed)")

    def _throttled(self, client: str) -> None:
        seen = self._failures.get(client)
        if seen is None:
            return
        now = self.clock()
        window = self.config.failed.window_s
        if now - seen.since >= window:
            del self._failures[client]
        elif seen.count >= self.config.failed.max_failures:
            raise RateLimited(
                f"too many failed authentications from this client; retry after the {window:g} s window",
                None,
                "too_many_failed_authentications",
                retry_after_s=seen.since + window - now,
            )

    def _failed(self, client: str) -> None:
        seen = self._failures.pop(client, None) or _Failures(0, self.clock())
        seen.count += 1
        self._failures[client] = seen  # most recent last
        while len(self._failures) > self.config.failed.max_clients:
            self._failures.popitem(last=False)

    # ----- limits ------------------------------------------------------------------------

    def admit(self, principal: Principal, model: str) -> Lease:
        """The request's hold on its key's limits, or the refusal: 403 for a model the key may
        not use, 429 for a limit (`Retry-After`: when it frees)."""
        if not principal.may_use(model):
            allowed = ", ".join(principal.policy.tiers or []) or "none"
            raise PermissionDenied(
                f"this API key may not use model {model!r} (it may use: {allowed})", "model", "model_not_allowed"
            )
        if principal.key_id is None:
            return Lease(None, principal)
        policy = principal.policy
        state = self._state_of(principal)
        now = self.clock()
        if policy.budget is not None:
            self._check_budget(principal)
        if policy.max_concurrent is not None and state.in_flight >= self._share(policy.max_concurrent):
            raise RateLimited(
                f"this API key has {policy.max_concurrent} requests in progress, its max_concurrent",
                None,
                "concurrency_limit_exceeded",
            )
        waits = []
        if state.requests is not None:
            waits.append(("requests_per_minute", state.requests.wait(1, now)))
        if state.tokens is not None:
            waits.append(("tokens_per_minute", state.tokens.wait(1, now)))
        for limit, wait in waits:
            if wait > 0:
                raise RateLimited(
                    f"this API key reached its {limit} ({getattr(policy, limit)}); retry in {wait:.1f} s",
                    None,
                    "rate_limit_exceeded",
                    retry_after_s=wait,
                )
        if state.requests is not None:
            state.requests.level -= 1
        state.in_flight += 1
        return Lease(self, principal)

    def _check_budget(self, principal: Principal) -> None:
        budget = principal.policy.budget
        assert budget is not None and principal.key_id is not None
        period, ends = period_of(budget, self.wall())
        tokens, cost = self._used.get(principal.key_id, (0, 0.0))
        for pending in (self._spent, self._flushing):
            t, c = pending.get((principal.key_id, period), (0, 0.0))
            tokens, cost = tokens + t, cost + c
        if (budget.tokens is not None and tokens >= budget.tokens) or (budget.cost is not None and cost >= budget.cost):
            raise QuotaExceeded(
                f"this API key spent its {budget.period}'s budget ({tokens} tokens, cost {cost:.4g}); "
                f"it renews at the start of the next {budget.period} (UTC)",
                None,
                retry_after_s=max(1.0, ends - self.wall()),
            )

    def _share(self, limit: float) -> float:
        return limit / max(1, self.replicas)

    def _state_of(self, principal: Principal) -> _KeyState:
        policy = principal.policy
        shape = (policy.requests_per_minute, policy.tokens_per_minute, self.replicas)
        state = self._state.get(principal.key_id)  # type: ignore[arg-type]
        if state is None or state.shape != shape:
            # New limits (the policy, or the replicas sharing it, changed): new buckets, which
            # keep what the old ones had spent.
            now = self.clock()
            old = state or _KeyState()
            state = _KeyState(in_flight=old.in_flight, shape=shape)
            if policy.requests_per_minute is not None:
                state.requests = _bucket(self._share(policy.requests_per_minute), now, old.requests)
            if policy.tokens_per_minute is not None:
                state.tokens = _bucket(self._share(policy.tokens_per_minute), now, old.tokens)
            self._state[principal.key_id] = state  # type: ignore[index]
        return state

    def _ended(self, principal: Principal, tokens: int, cost: float) -> None:
        state = self._state_of(principal)
        state.in_flight = max(0, state.in_flight - 1)
        if state.tokens is not None and tokens:
            state.tokens.refill(self.clock())
            state.tokens.level -= tokens
        budget = principal.policy.budget
        if budget is not None and (tokens or cost):
            period = period_of(budget, self.wall())[0]
            _add(self._spent, {(principal.key_id, period): (tokens, cost)})  # type: ignore[dict-item]

    def in_flight(self, key_id: str) -> int:
        """Requests of the key in progress on this replica."""
        state = self._state.get(key_id)
        return state.in_flight if state is not None else 0


def _bucket(per_minute: float, now: float, old: TokenBucket | None) -> TokenBucket:
    """A bucket of a minute's worth (at least 1), refilled over the minute; as spent as `old`."""
    bucket = TokenBucket(max(1.0, per_minute), per_minute / 60, now)
    if old is not None:
        old.refill(now)
        bucket.level = min(bucket.capacity, bucket.capacity - (old.capacity - old.level))
    return bucket


def _add(into: dict[tuple[str, str], tuple[int, float]], more: dict[tuple[str, str], tuple[int, float]]) -> None:
    for k, (t, c) in more.items():
        t0, c0 = into.get(k, (0, 0.0))
        into[k] = (t0 + t, c0 + c)
