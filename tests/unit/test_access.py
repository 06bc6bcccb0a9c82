"""API keys, their store and the per-key limits (`router/keys.py`, `router/access.py`), as plain
code with a clock the tests move."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import stat

import pytest

from tierserve.core.errors import PermissionDenied, QuotaExceeded, RateLimited, Unauthenticated
from tierserve.router.access import ANONYMOUS, Access
from tierserve.router.audit import Auditor, AuditRecord
from tierserve.router.config import AuthConfig
from tierserve.router.keys import Budget, KeyPolicy, KeyStore, load_server_secret, parse_token, period_of


class Clock:
    def __init__(self, start: float = 1000.0, wall: float | None = None):
        self.now = start
        self.wall_now = wall if wall is not None else dt.datetime(2026, 12, 6, 12, tzinfo=dt.timezone.utc).timestamp()

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.wall_now

    def advance(self, s: float) -> None:
        self.now += s
        self.wall_now += s


@pytest.fixture
def store(tmp_path):
    secret = load_server_secret("TIERSERVE_TEST_NO_SUCH_ENV", tmp_path / "keys.secret")
    return KeyStore(tmp_path / "keys.db", secret)


def access(store, clock=None, **auth) -> Access:
    clock = clock or Clock()
    return Access(AuthConfig(enabled=True, **auth), store, clock=clock, wall=clock.wall)


def test_a_key_is_shown_once_and_stored_only_as_a_salted_hmac(store, tmp_path):
    key, token = store.create("alice", KeyPolicy())
    key_id, secret = parse_token(token)
    assert key_id == key.id and len(secret) == 43
    raw = (tmp_path / "keys.db").read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("keys.db-*"))
    assert secret.encode() not in raw and token.encode() not in raw
    # Files only their owner can read.
    for name in ("keys.db", "keys.secret"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    # Two keys with the same secret would still hash differently: each has its salt.
    other, _ = store.create("bob", KeyPolicy())
    assert other.salt != key.salt


def test_authentication_accepts_the_key_and_refuses_everything_else(store):
    _, token = store.create("alice", KeyPolicy(tiers=["auto"]))
    a = access(store)
    principal = a.authenticate(token, "10.0.0.1")
    assert principal.name == "alice" and principal.policy.tiers == ["auto"]
    key_id = principal.key_id
    for bad in (None, "", "sk-openai-style", token[:-1] + ("A" if token[-1] != "A" else "B"), f"tsk-{key_id}-x"):
        with pytest.raises(Unauthenticated):
            a.authenticate(bad, "10.0.0.2")
    # Another store's secret makes the same key worthless.
    store.server_secret = b"another server secret of enough length...."
    a2 = Access(AuthConfig(enabled=True), store)
    with pytest.raises(Unauthenticated):
        a2.authenticate(token, "x")


def test_auth_off_lets_everyone_in_as_anonymous_with_every_tier_and_index():
    a = Access(AuthConfig(enabled=False), None)
    principal = a.authenticate(None, "x")
    assert principal is ANONYMOUS and principal.admin and principal.may_read("anything")
    lease = a.admit(principal, "auto")
    lease.end(100, 1.0)


def test_revocation_and_rotation_take_effect_at_the_next_refresh(store):
    clock = Clock()
    key, token = store.create("alice", KeyPolicy())
    a = access(store, clock, refresh_s=2.0)
    a.authenticate(token)
    store.revoke(key.id)
    a.authenticate(token)  # still in memory until the refresh
    clock.advance(2.0)
    asyncio.run(a.refresh())
    with pytest.raises(Unauthenticated):
        a.authenticate(token)
    other, old = store.create("bob", KeyPolicy())
    new = store.rotate(other.id)
    clock.advance(2.0)
    asyncio.run(a.refresh())
    assert a.authenticate(new).key_id == other.id
    with pytest.raises(Unauthenticated):
        a.authenticate(old)
    with pytest.raises(KeyError):
        store.rotate(key.id)  # revoked keys stay revoked


def test_repeated_failures_from_one_client_are_refused_until_the_window_ends(store):
    clock = Clock()
    _, token = store.create("alice", KeyPolicy())
    a = access(store, clock, failed={"max_failures": 3, "window_s": 10})
    bad = "tsk-000000000000-" + "x" * 43
    for _ in range(3):
        with pytest.raises(Unauthenticated):
            a.authenticate(bad, "6.6.6.6")
    with pytest.raises(RateLimited) as slowed:
        a.authenticate(bad, "6.6.6.6")
    assert slowed.value.code == "too_many_failed_authentications" and 0 < slowed.value.retry_after_s <= 10
    with pytest.raises(RateLimited):
        a.authenticate(None, "6.6.6.6")
    # A valid key gets in from that address all the same: bad keys sent from behind a shared
    # address (a load balancer) lock no one out.
    assert a.authenticate(token, "6.6.6.6").name == "alice"
    with pytest.raises(Unauthenticated):
        a.authenticate(bad, "7.7.7.7")  # other addresses have their own count
    clock.advance(10)
    with pytest.raises(Unauthenticated):
        a.authenticate(bad, "6.6.6.6")  # the window is over: a plain 401 again


def test_failed_clients_are_remembered_in_bounded_memory(store):
    a = access(store, failed={"max_failures": 1, "window_s": 60, "max_clients": 100})
    for i in range(1000):
        with pytest.raises(Unauthenticated):
            a.authenticate(None, f"client-{i}")
    assert len(a._failures) == 100


def test_tiers_a_key_may_not_use_are_refused_with_403(store):
    _, token = store.create("alice", KeyPolicy(tiers=["auto", "small"]))
    a = access(store)
    principal = a.authenticate(token)
    a.admit(principal, "small").end()
    a.admit(principal, "auto").end()
    with pytest.raises(PermissionDenied) as denied:
        a.admit(principal, "quality")
    assert denied.value.param == "model" and denied.value.code == "model_not_allowed"


def test_indexes_are_deny_by_default_and_admin_is_a_scope(store):
    _, plain = store.create("plain", KeyPolicy())
    _, reader = store.create("reader", KeyPolicy(indexes=["alpha"]))
    _, everything = store.create("all", KeyPolicy(indexes=["*"], admin=True))
    a = access(store)
    assert not a.authenticate(plain).may_read("alpha")
    assert a.authenticate(reader).may_read("alpha") and not a.authenticate(reader).may_read("beta")
    assert a.authenticate(everything).may_read("beta")
    with pytest.raises(PermissionDenied):
        a.authenticate(reader).require_admin("/v1/tiers")
    a.authenticate(everything).require_admin("/v1/tiers")


def test_requests_per_minute_is_a_token_bucket_that_refills(store):
    clock = Clock()
    _, token = store.create("alice", KeyPolicy(requests_per_minute=6))
    a = access(store, clock)
    principal = a.authenticate(token)
    for _ in range(6):
        a.admit(principal, "auto").end()
    with pytest.raises(RateLimited) as limited:
        a.admit(principal, "auto")
    assert limited.value.code == "rate_limit_exceeded"
    assert 9.9 <= limited.value.retry_after_s <= 10.0  # one request every 10 s
    clock.advance(10)
    a.admit(principal, "auto").end()


def test_tokens_per_minute_charges_what_a_request_spent(store):
    clock = Clock()
    _, token = store.create("alice", KeyPolicy(tokens_per_minute=60))
    a = access(store, clock)
    principal = a.authenticate(token)
    a.admit(principal, "auto").end(tokens=70)  # let in with tokens left; spends past them
    with pytest.raises(RateLimited) as limited:
        a.admit(principal, "auto")
    assert 10.9 <= limited.value.retry_after_s <= 11.0  # 11 tokens at 1 a second
    clock.advance(11)
    a.admit(principal, "auto").end(tokens=5)


def test_concurrent_requests_are_bounded_and_a_lease_is_given_back_once(store):
    _, token = store.create("alice", KeyPolicy(max_concurrent=2))
    a = access(store)
    principal = a.authenticate(token)
    first, second = a.admit(principal, "auto"), a.admit(principal, "auto")
    with pytest.raises(RateLimited) as limited:
        a.admit(principal, "auto")
    assert limited.value.code == "concurrency_limit_exceeded"
    first.end()
    first.end()  # twice: counted once
    assert a.in_flight(principal.key_id) == 1
    a.admit(principal, "auto")
    second.end()


def test_limits_are_split_among_the_ingress_replicas(store):
    clock = Clock()
    _, token = store.create("alice", KeyPolicy(requests_per_minute=6, max_concurrent=4))
    a = access(store, clock)
    a.replicas = 2
    principal = a.authenticate(token)
    leases = [a.admit(principal, "auto") for _ in range(2)]
    with pytest.raises(RateLimited):
        a.admit(principal, "auto")  # 2 of 4 concurrent here; the other replica holds the rest
    for lease in leases:
        lease.end()
    a.admit(principal, "auto").end()
    with pytest.raises(RateLimited):
        a.admit(principal, "auto")  # 3 of 6 a minute here


def test_a_budget_is_shared_through_the_store_and_renews_with_its_period(store):
    clock = Clock()
    _, token = store.create("alice", KeyPolicy(budget=Budget(period="day", tokens=100)))
    one, two = access(store, clock, refresh_s=1), access(store, clock, refresh_s=1)  # two ingress replicas
    principal = one.authenticate(token)
    one.admit(principal, "auto").end(tokens=60)
    two.admit(principal, "auto").end(tokens=50)
    one.admit(principal, "auto").end()  # 60 here is not over; the store does not know the 50 yet
    clock.advance(1)
    asyncio.run(one.refresh())
    asyncio.run(two.refresh())  # each writes what it spent and reads the total
    clock.advance(1)
    asyncio.run(one.refresh())
    with pytest.raises(QuotaExceeded) as spent:
        one.admit(principal, "auto")
    error = spent.value
    assert error.status_code == 429 and error.code == "insufficient_quota" and error.error_type == "insufficient_quota"
    assert 11.9 * 3600 <= error.retry_after_s <= 12 * 3600  # noon to midnight UTC
    assert store.usage({principal.key_id: "2026-12-06"}) == {principal.key_id: (110, 0.0)}
    clock.advance(12 * 3600)  # the next day
    asyncio.run(one.refresh())
    one.admit(principal, "auto").end(tokens=10)


def test_budget_periods_are_utc_days_and_months():
    at = dt.datetime(2026, 12, 31, 23, 59, tzinfo=dt.timezone.utc).timestamp()
    assert period_of(Budget(period="day"), at) == ("2026-12-31", at + 60)
    label, ends = period_of(Budget(period="month"), at)
    assert label == "2026-12" and ends == dt.datetime(2027, 1, 1, tzinfo=dt.timezone.utc).timestamp()


def test_spending_the_store_could_not_take_is_kept_for_the_next_refresh(store, monkeypatch):
    clock = Clock()
    _, token = store.create("alice", KeyPolicy(budget=Budget(tokens=1000)))
    a = access(store, clock, refresh_s=1)
    principal = a.authenticate(token)
    a.admit(principal, "auto").end(tokens=40)

    def broken(spent):
        raise OSError("disk full")

    monkeypatch.setattr(store, "record", broken)  # a store that fails to write (mock: no other way to make it)
    clock.advance(1)
    asyncio.run(a.refresh())
    monkeypatch.undo()
    clock.advance(1)
    asyncio.run(a.refresh())
    period = period_of(principal.policy.budget, clock.wall())[0]
    assert store.usage({principal.key_id: period}) == {principal.key_id: (40, 0.0)}


def test_the_audit_line_holds_no_prompt_text_and_a_stable_keyed_fingerprint(tmp_path):
    from tierserve.router.protocol import ChatCompletionRequest

    lines = []
    auditor = Auditor(str(tmp_path / "audit.jsonl"), b"s" * 32, observe=lines.append)
    body = ChatCompletionRequest.model_validate(
        {"model": "auto", "messages": [{"role": "user", "content": "mail jane.doe@example.com"}]}
    )
    record = AuditRecord("POST /v1/chat/completions", "10.0.0.1", key_id="abc", key_name="alice", model="auto")
    record.prompt_sha256 = auditor.fingerprint(body)
    record.failed(429, "rate_limit_exceeded")
    closed = []
    record.closers.append(lambda: closed.append(1))
    auditor.close(record)
    auditor.close(record)  # once only
    assert closed == [1]
    (line,) = lines
    assert "jane.doe" not in json.dumps(line)
    assert line["key_id"] == "abc" and line["status"] == 429 and line["code"] == "rate_limit_exceeded"
    other = Auditor(str(tmp_path / "other.jsonl"), b"t" * 32)
    assert line["prompt_sha256"] == auditor.fingerprint(body) != other.fingerprint(body)
    assert Auditor(None, b"s" * 32).fingerprint(body) is None  # no line, no fingerprint
    written = (tmp_path / "other.jsonl").read_text() + (tmp_path / "audit.jsonl").read_text()
    assert json.loads(written.splitlines()[-1])["key_id"] == "abc" and "jane.doe" not in written


def test_keys_are_reread_even_when_spending_cannot_be_written(store, monkeypatch):
    clock = Clock()
    key, token = store.create("alice", KeyPolicy())
    a = access(store, clock, refresh_s=1)
    a.authenticate(token)

    def broken(spent):
        raise OSError("read-only file system")

    monkeypatch.setattr(store, "record", broken)  # mock: a store that cannot be written
    store.revoke(key.id)
    clock.advance(1)
    asyncio.run(a.refresh())
    with pytest.raises(Unauthenticated):
        a.authenticate(token)  # the revocation applies though the spending could not be written


def test_new_limits_keep_what_was_spent(store):
    clock = Clock()
    _, token = store.create("alice", KeyPolicy(requests_per_minute=6))
    a = access(store, clock)
    principal = a.authenticate(token)
    for _ in range(6):
        a.admit(principal, "auto").end()
    a.replicas = 2  # a second ingress replica: half the limit here, and nothing given back
    with pytest.raises(RateLimited):
        a.admit(principal, "auto")
