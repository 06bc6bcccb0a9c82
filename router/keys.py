"""API keys: their format, their policy and the store that keeps them.

A key is `tsk-<id>-<secret>`: the id (12 hex digits) names it in logs, metrics and the CLI; the
secret (32 random bytes) is shown once, when `tierserve keys create` or `rotate` makes it, and
stored only as `HMAC-SHA256(server secret, salt + secret)` with a salt of its own. A stolen
store without the server secret gives nothing to test guesses against; with it, a guess still
has to find 256 random bits. Checking a key is one HMAC and a constant-time compare.

The store is one SQLite file: keys, and the tokens and cost each key spent per budget
period, which every ingress replica adds to and reads, so budgets hold across replicas and
restarts. It keeps SQLite's rollback journal (not WAL, which needs the readers and writers on
one host), so replicas on several nodes may share it on a file system with working POSIX locks.
Plain code: no Ray, no HTTP (`tierserve.router.access` uses it at the ingress).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import os
import re
import secrets
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tierserve.core.config import default_cache_dir
from tierserve.router.config import AuthConfig

PREFIX = "tsk"
_TOKEN = re.compile(r"^tsk-([0-9a-f]{12})-([A-Za-z0-9_-]{43})$")
ALL = "*"
"""In a policy's `indexes`: every index."""


class Budget(BaseModel):
    """What a key may spend per period; it renews at the period's start (UTC)."""

    model_config = ConfigDict(extra="forbid")

    period: Literal["day", "month"] = "month"
    tokens: int | None = Field(None, ge=0)
    """Prompt plus completion tokens."""
    cost: float | None = Field(None, ge=0)
    """In the unit of the tiers' prices (`routing.tiers.<tier>.cost`)."""


class KeyPolicy(BaseModel):
    """What one key may reach and spend. Unset limits do not limit."""

    model_config = ConfigDict(extra="forbid")

    tiers: list[str] | None = None
    """Model names the key may ask for (`auto` and tier names); None: all. `auto` routes among
    the tiers listed, or among all of them when `auto` is the only name (a key that may not pick
    its tier)."""
    indexes: list[str] = Field(default_factory=list)
    """Retrieval indexes the key may query (`*`: all); others look to it as if they did not exist."""
    admin: bool = False
    """The admin scope: `/v1/tiers`, `/v1/indexes`, `/docs`, `/openapi.json`, `/health` in full."""
    requests_per_minute: int | None = Field(None, ge=1)
    tokens_per_minute: int | None = Field(None, ge=1)
    """Prompt plus completion tokens; a request is let in while the minute's tokens are not spent."""
    max_concurrent: int | None = Field(None, ge=1)
    """Requests (streams included) in progress at once."""
    budget: Budget | None = None

    def may_use(self, model: str) -> bool:
        return self.tiers is None or model in self.tiers

    def may_read(self, index: str) -> bool:
        return ALL in self.indexes or index in self.indexes


@dataclass(frozen=True)
class ApiKey:
    """A key as the store holds it (no secret)."""

    id: str
    name: str
    policy: KeyPolicy
    created: float
    revoked: float | None = None
    rotated: float | None = None
    salt: bytes = b""
    digest: str = ""

    def summary(self) -> dict[str, object]:
        """What `tierserve keys list` shows."""
        return {
            "id": self.id,
            "name": self.name,
            "created": _iso(self.created),
            "rotated": _iso(self.rotated),
            "revoked": _iso(self.revoked),
            "policy": self.policy.model_dump(exclude_none=True, exclude_defaults=True),
        }


def _iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="seconds")


def parse_token(token: str) -> tuple[str, str] | None:
    """(key id, secret) of a well-formed key, else None."""
    m = _TOKEN.match(token)
    return (m.group(1), m.group(2)) if m else None


def digest(server_secret: bytes, salt: bytes, secret: str) -> str:
    return hmac.new(server_secret, salt + secret.encode(), hashlib.sha256).hexdigest()


def matches(key: ApiKey, server_secret: bytes, secret: str) -> bool:
    """Whether `secret` is this key's, in constant time."""
    return hmac.compare_digest(digest(server_secret, key.salt, secret), key.digest)


def period_of(budget: Budget, now: float) -> tuple[str, float]:
    """The budget period `now` falls in (its label in the store) and when it ends (epoch s)."""
    t = dt.datetime.fromtimestamp(now, dt.timezone.utc)
    if budget.period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.strftime("%Y-%m-%d"), (start + dt.timedelta(days=1)).timestamp()
    start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start.strftime("%Y-%m"), end.timestamp()


def load_server_secret(env: str, path: Path, create: bool = True) -> bytes:
    """The server secret: `$env` when set, else the file, made (0600) when missing and `create`."""
    value = os.environ.get(env)
    if value:
        if len(value) < 32:
            raise ValueError(f"${env} holds a server secret shorter than 32 characters")
        return value.encode()
    if not path.exists():
        if not create:
            raise FileNotFoundError(f"no server secret: set ${env} or create {path}")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(48))
    secret = path.read_text().strip()
    if len(secret) < 32:
        raise ValueError(f"the server secret in {path} is shorter than 32 characters")
    return secret.encode()


_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, salt BLOB NOT NULL, digest TEXT NOT NULL,
    policy TEXT NOT NULL, created REAL NOT NULL, rotated REAL, revoked REAL
);
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT NOT NULL, period TEXT NOT NULL, tokens INTEGER NOT NULL DEFAULT 0,
    cost REAL NOT NULL DEFAULT 0, PRIMARY KEY (key_id, period)
);
"""


class KeyStore:
    """The keys and their spending in one SQLite file. Each call opens its own connection, so
    one store may be used from any thread (the ingress calls it through `asyncio.to_thread`)."""

    def __init__(self, path: Path, server_secret: bytes):
        self.path = Path(path)
        self.server_secret = server_secret
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(_SCHEMA)
        os.chmod(self.path, 0o600)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=10)
        try:
            with db:
                yield db
        finally:
            db.close()

    def create(self, name: str, policy: KeyPolicy) -> tuple[ApiKey, str]:
        """A new key and its token (`tsk-<id>-<secret>`), which is not stored and cannot be shown again."""
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        key = ApiKey(key_id, name, policy, time.time(), salt=salt, digest=digest(self.server_secret, salt, secret))
        with self._db() as db:
            db.execute(
                "INSERT INTO keys (id, name, salt, digest, policy, created) VALUES (?, ?, ?, ?, ?, ?)",
                (key.id, key.name, key.salt, key.digest, policy.model_dump_json(), key.created),
            )
        return key, f"{PREFIX}-{key_id}-{secret}"

    def rotate(self, key_id: str) -> str:
        """A new secret for the key (same id and policy); the old one stops working."""
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        with self._db() as db:
            done = db.execute(
                "UPDATE keys SET salt = ?, digest = ?, rotated = ? WHERE id = ? AND revoked IS NULL",
                (salt, digest(self.server_secret, salt, secret), time.time(), key_id),
            ).rowcount
        if not done:
            raise KeyError(f"no active key {key_id!r}")
        return f"{PREFIX}-{key_id}-{secret}"

    def update(self, key_id: str, policy: KeyPolicy) -> None:
        """A new policy for an active key (its secret unchanged)."""
        with self._db() as db:
            done = db.execute(
                "UPDATE keys SET policy = ? WHERE id = ? AND revoked IS NULL", (policy.model_dump_json(), key_id)
            ).rowcount
        if not done:
            raise KeyError(f"no active key {key_id!r}")

    def revoke(self, key_id: str) -> None:
        with self._db() as db:
            done = db.execute(
                "UPDATE keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), key_id)
            ).rowcount
        if not done:
            raise KeyError(f"no active key {key_id!r}")

    def keys(self) -> dict[str, ApiKey]:
        """Every key, revoked ones included, by id."""
        with self._db() as db:
            rows = db.execute("SELECT id, name, policy, created, revoked, rotated, salt, digest FROM keys").fetchall()
        return {
            r[0]: ApiKey(r[0], r[1], KeyPolicy.model_validate_json(r[2]), r[3], r[4], r[5], bytes(r[6]), r[7])
            for r in rows
        }

    def record(self, spent: dict[tuple[str, str], tuple[int, float]]) -> None:
        """Add spending: {(key id, period): (tokens, cost)}."""
        if not spent:
            return
        with self._db() as db:
            db.executemany(
                "INSERT INTO usage (key_id, period, tokens, cost) VALUES (?, ?, ?, ?) ON CONFLICT (key_id, period) "
                "DO UPDATE SET tokens = tokens + excluded.tokens, cost = cost + excluded.cost",
                [(k, p, t, c) for (k, p), (t, c) in spent.items()],
            )

    def usage(self, periods: dict[str, str]) -> dict[str, tuple[int, float]]:
        """What each key spent in its period: {key id: (tokens, cost)} for {key id: period}."""
        if not periods:
            return {}
        with self._db() as db:
            rows = db.execute("SELECT key_id, period, tokens, cost FROM usage").fetchall()
        return {k: (t, c) for k, p, t, c in rows if periods.get(k) == p}


def store_path(config: AuthConfig, model_cache: str | Path | None) -> Path:
    """`auth.store`, else `<model cache>/auth/keys.db`."""
    if config.store:
        return Path(config.store).expanduser()
    return (Path(model_cache).expanduser() if model_cache else default_cache_dir()) / "auth" / "keys.db"


def open_store(config: AuthConfig, model_cache: str | Path | None) -> KeyStore:
    """The key store `auth` names, with its server secret (`auth.secret_env`, else
    `auth.secret_file`, else `keys.secret` beside the store, made if missing)."""
    secret = load_server_secret(config.secret_env, secret_file(config, model_cache))
    return KeyStore(store_path(config, model_cache), secret)


def secret_file(config: AuthConfig, model_cache: str | Path | None) -> Path:
    """`auth.secret_file`, else `keys.secret` beside the store."""
    if config.secret_file:
        return Path(config.secret_file).expanduser()
    return store_path(config, model_cache).with_name("keys.secret")
