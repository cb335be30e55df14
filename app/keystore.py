"""The gateway's API keys and usage rows, in one SQLite file (WAL mode; `GATEWAY_DB`, created on first start).

A key is `sk-<id>-<secret>`: the id finds its row, the secret is checked against a salted SHA-256 of it with
`hmac.compare_digest` (the secret is 256 random bits, so a fast hash is enough: nothing to brute-force, and a check
costs microseconds, not the milliseconds of a password hash). Neither the key nor its secret is stored anywhere;
`create` returns it once. Revocation, new keys and new limits made by another process (the admin CLI, `python -m
app.keys`) are seen on the gateway's next request: every change of the keys table bumps a version number in the
same transaction, and `changed()` reads it (one row; the usage rows written meanwhile do not count).

Usage rows hold counts only (tokens, time, status): never a prompt or an answer. They are written by `UsageWriter`'s
thread, in batches, one commit each; `record` returns a future that is done once its row is committed, so a caller
that waits for it before its last byte (the gateway does) never answers a request whose row a crash could lose.
"""

from __future__ import annotations

import calendar
import concurrent.futures
import dataclasses
import hashlib
import hmac
import logging
import math
import queue
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    salt BLOB NOT NULL,
    digest BLOB NOT NULL,
    created REAL NOT NULL,
    revoked REAL,
    rpm INTEGER,
    tpm INTEGER,
    budget REAL,
    budget_period TEXT NOT NULL DEFAULT 'day',
    prompt_weight REAL NOT NULL DEFAULT 1.0,
    completion_weight REAL NOT NULL DEFAULT 1.0,
    max_concurrent INTEGER
);
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    key_id TEXT NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cached_tokens INTEGER NOT NULL,
    cost REAL NOT NULL,
    duration_ms INTEGER NOT NULL,
    status TEXT NOT NULL,
    request_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_by_key ON usage (key_id, at);
CREATE TABLE IF NOT EXISTS meta (id INTEGER PRIMARY KEY CHECK (id = 0), keys_version INTEGER NOT NULL);
INSERT OR IGNORE INTO meta VALUES (0, 0);
"""
PERIODS = ("day", "month")
WRITE_ATTEMPTS = 3  # a batch's transaction, tried again while the store is locked (each waits up to 10 s)
USAGE_COLUMNS = ("at", "key_id", "model", "endpoint", "prompt_tokens", "completion_tokens", "cached_tokens", "cost",
                 "duration_ms", "status", "request_id")


@dataclass(frozen=True)
class Limits:
    """A key's limits; None: unlimited. `budget` is in cost units per `budget_period` (a UTC calendar day or month):
    a request costs prompt_weight × prompt tokens + completion_weight × completion tokens."""

    rpm: int | None = None
    tpm: int | None = None
    budget: float | None = None
    budget_period: str = "day"
    prompt_weight: float = 1.0
    completion_weight: float = 1.0
    max_concurrent: int | None = None

    def __post_init__(self) -> None:
        for name in ("rpm", "tpm", "max_concurrent"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer (or unset)")
        if self.budget is not None and not (self.budget > 0 and math.isfinite(self.budget)):
            raise ValueError("budget must be a positive number (or unset)")
        if self.budget_period not in PERIODS:
            raise ValueError(f"budget_period must be one of {PERIODS}")
        if not all(math.isfinite(w) and w >= 0 for w in (self.prompt_weight, self.completion_weight)):
            raise ValueError("weights must be finite and non-negative")

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return self.prompt_weight * prompt_tokens + self.completion_weight * completion_tokens


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    created: float
    revoked: float | None = None
    limits: Limits = Limits()


@dataclass(frozen=True)
class UsageRow:
    at: float
    key_id: str
    model: str
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost: float
    duration_ms: int
    status: str
    request_id: str

    def values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, column) for column in USAGE_COLUMNS)


def period_start(period: str, now: float) -> float:
    """When the UTC day or month holding `now` began."""
    t = time.gmtime(now)
    return float(calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday if period == "day" else 1, 0, 0, 0)))


def period_end(period: str, now: float) -> float:
    t = time.gmtime(now)
    if period == "day":
        return period_start(period, now) + 86400
    year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return float(calendar.timegm((year, month, 1, 0, 0, 0)))


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection to the store, creating the file and its tables on first use (WAL: readers never wait for the
    writer; synchronous=NORMAL: a commit survives the process being killed, not a power cut mid-checkpoint)."""
    Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(Path(path).expanduser(), timeout=10.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    for table, columns in _COLUMNS.items():  # tables of these names made by something else: not this store
        have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
        if missing := [c for c in columns if c not in have]:
            db.close()
            raise sqlite3.DatabaseError(f"its table {table!r} is not a key store's (no column {missing[0]!r})")
    return db


_COLUMNS = {"keys": ("id", "name", "salt", "digest", "created", "revoked", "rpm", "tpm", "budget", "budget_period",
                     "prompt_weight", "completion_weight", "max_concurrent"),
            "usage": USAGE_COLUMNS, "meta": ("id", "keys_version")}


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode()).digest()


def split_key(token: str) -> tuple[str, str] | None:
    """(id, secret) of a key of this store's form, else None."""
    prefix, _, rest = token.partition("-")
    key_id, _, secret = rest.partition("-")
    if prefix != "sk" or not key_id or not secret or len(key_id) > 32 or not key_id.isalnum():
        return None
    return key_id, secret


class KeyStore:
    """Keys and usage (see the module's docstring). One per process; calls run on the caller's thread (each is one
    short statement: microseconds), except the usage rows' writes, which are `UsageWriter`'s."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.db = connect(self.path)
        self._version: int | None = None
        self._lock = threading.Lock()  # the connection is shared by the event loop and the CLI's or tests' threads

    # ---- keys -------------------------------------------------------------------------------------------------
    def create(self, name: str, limits: Limits = Limits()) -> tuple[KeyRecord, str]:
        """A new key: its record and the key itself (shown once, stored nowhere)."""
        key_id, secret, salt = secrets.token_hex(6), secrets.token_urlsafe(32), secrets.token_bytes(16)
        record = KeyRecord(key_id, name, time.time(), None, limits)
        self._change("INSERT INTO keys (id, name, salt, digest, created, rpm, tpm, budget, budget_period, "
                     "prompt_weight, completion_weight, max_concurrent) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                     (key_id, name, salt, _digest(salt, secret), record.created, *_limit_values(limits)))
        return record, f"sk-{key_id}-{secret}"

    def _change(self, statement: str, args: tuple[Any, ...]) -> int:
        """A change of the keys table and the bump of its version, in one transaction → rows changed."""
        with self._lock, self.db:
            self.db.execute("BEGIN IMMEDIATE")
            rows = self.db.execute(statement, args).rowcount
            self.db.execute("UPDATE meta SET keys_version = keys_version + 1")
        return rows

    def verify(self, token: str) -> KeyRecord | None:
        """The record of a valid, unrevoked key; None for anything else."""
        parts = split_key(token)
        if parts is None:
            return None
        with self._lock:
            row = self.db.execute(f"SELECT salt, digest, {_RECORD} FROM keys WHERE id = ?", (parts[0],)).fetchone()
        if row is None or not hmac.compare_digest(_digest(row[0], parts[1]), row[1]):
            return None
        record = _record(row[2:])
        return record if record is not None and record.revoked is None else None

    def get(self, key_id: str) -> KeyRecord | None:
        """The key's record; None where there is none, or its stored limits are invalid (see `_record`)."""
        with self._lock:
            row = self.db.execute(f"SELECT {_RECORD} FROM keys WHERE id = ?", (key_id,)).fetchone()
        return _record(row) if row else None

    def records(self) -> list[KeyRecord]:
        """Every key's record but those whose stored limits are invalid (logged; see `_record`)."""
        with self._lock:
            rows = self.db.execute(f"SELECT {_RECORD} FROM keys ORDER BY created").fetchall()
        return [record for record in map(_record, rows) if record is not None]

    def has_keys(self) -> bool:
        """Whether any key was ever made (revoked ones count: revoking every key must not open the gateway)."""
        with self._lock:
            return self.db.execute("SELECT 1 FROM keys LIMIT 1").fetchone() is not None

    def revoke(self, key_id: str) -> bool:
        return self._change("UPDATE keys SET revoked = ? WHERE id = ? AND revoked IS NULL", (time.time(), key_id)) == 1

    def set_limits(self, key_id: str, limits: Limits) -> bool:
        return self._change("UPDATE keys SET rpm=?, tpm=?, budget=?, budget_period=?, prompt_weight=?, "
                            "completion_weight=?, max_concurrent=? WHERE id = ?", (*_limit_values(limits), key_id)) == 1

    def changed(self) -> bool:
        """Whether the keys changed since the last call (the first call: True)."""
        with self._lock:
            version = self.db.execute("SELECT keys_version FROM meta").fetchone()[0]
        changed, self._version = version != self._version, version
        return changed

    # ---- usage ------------------------------------------------------------------------------------------------
    def spent(self, key_id: str, since: float) -> float:
        with self._lock:
            row = self.db.execute("SELECT COALESCE(SUM(cost), 0) FROM usage WHERE key_id = ? AND at >= ?",
                                  (key_id, since)).fetchone()
        return float(row[0])

    def usage(self, key_id: str | None = None, since: float = 0.0, until: float = float("inf")) -> Iterator[UsageRow]:
        query = f"SELECT {', '.join(USAGE_COLUMNS)} FROM usage WHERE at >= ? AND at < ?"
        args: list[Any] = [since, until if until != float("inf") else 1e18]
        if key_id is not None:
            query += " AND key_id = ?"
            args.append(key_id)
        with self._lock:
            rows = self.db.execute(query + " ORDER BY id", args).fetchall()
        return (UsageRow(*row) for row in rows)

    def close(self) -> None:
        with self._lock:
            self.db.close()


_RECORD = ("id, name, created, revoked, rpm, tpm, budget, budget_period, prompt_weight, completion_weight, "
           "max_concurrent")


def _record(row: tuple[Any, ...]) -> KeyRecord | None:
    """A key's row → its record; None (logged) where the stored limits are not what `Limits` accepts (a row written
    by hand, e.g. an infinite weight or an rpm of 0): that key is refused, the others are served."""
    try:
        return KeyRecord(row[0], row[1], row[2], row[3], Limits(*row[4:]))
    except (TypeError, ValueError) as e:
        if row[0] not in _INVALID_LOGGED:  # once per key and process, not once per request of its holder
            _INVALID_LOGGED.add(row[0])
            logger.error("key %r has invalid limits in the key store (%s): refused until they are set again", row[0],
                         e)
        return None


_INVALID_LOGGED: set[str] = set()


def _limit_values(limits: Limits) -> tuple[Any, ...]:
    return tuple(getattr(limits, f.name) for f in dataclasses.fields(Limits))


class UsageWriter:
    """Writes usage rows in a thread of its own (the event loop never waits on the disk), in batches of whatever
    queued meanwhile, one transaction each. `record` returns a future done once the row is committed (with its
    exception if the write failed); `close` writes what is queued, then stops."""

    def __init__(self, path: str | Path):
        self._queue: queue.SimpleQueue[tuple[UsageRow, concurrent.futures.Future[None]] | None] = queue.SimpleQueue()
        self._db = connect(path)
        self._thread = threading.Thread(target=self._run, name="usage-writer", daemon=True)
        self._thread.start()

    def record(self, row: UsageRow) -> concurrent.futures.Future[None]:
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put((row, done))
        return done

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()
        self._db.close()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while True:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = None in batch
            items = [item for item in batch if item is not None]
            if items:
                self._write(items)

    def _write(self, items: list[tuple[UsageRow, concurrent.futures.Future[None]]]) -> None:
        """One transaction for the batch (BEGIN IMMEDIATE: the write lock first, retried while another process
        holds it); whatever fails is logged and given to the batch's futures, and the thread goes on."""
        error: Exception | None = None
        for attempt in range(WRITE_ATTEMPTS):
            try:
                with self._db:
                    self._db.execute("BEGIN IMMEDIATE")
                    self._db.executemany(f"INSERT INTO usage ({', '.join(USAGE_COLUMNS)}) VALUES "
                                         f"({', '.join('?' * len(USAGE_COLUMNS))})",
                                         [row.values() for row, _ in items])
                error = None
                break
            except sqlite3.OperationalError as e:  # locked or busy past the timeout: again
                error = e
                time.sleep(0.05 * (attempt + 1))
            except Exception as e:
                error = e
                break
        if error is not None:
            logger.error("%d usage rows were not written: %r", len(items), error)
        for _, done in items:
            if done.set_running_or_notify_cancel():  # a future its waiter cancelled takes no result
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)
