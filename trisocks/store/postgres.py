"""The store on PostgreSQL: the users, per-user accounting and limits of the SQLite store
(:mod:`trisocks.store.sqlite`), shared by every instance of a fleet.

The tables and their meaning are those of the SQLite store (same names, same columns; a test
compares the two schemas), in PostgreSQL's dialect. Every write also sends a notification on
``trisocks_store`` in its transaction, so running instances refresh their cached view
(:mod:`trisocks.store.cache`) right after it commits, not at their next periodic refresh.

Calls block (psycopg, a connection pool): the CLI makes them directly; the server only through
:class:`~trisocks.store.cache.CachedStore`, from worker threads.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator
from typing import Any

import psycopg
import psycopg_pool

from trisocks.policy.quotas import LIMIT_FIELDS, UserLimits, period_starts
from trisocks.store.legacy import rename_legacy_names
from trisocks.store.records import (
    Snapshot,
    StoreError,
    UsageDelta,
    UserUsage,
    is_external,
    schema_error,
    validate_username,
)
from trisocks.store.sql import Cursor, PostgresDatabase, migrate

__all__ = ["STORE_CHANNEL", "PostgresStore", "Snapshot"]

STORE_CHANNEL = "trisocks_store"
"""NOTIFY channel: users, limits or accounting changed."""

CONNECT_TIMEOUT = 10.0

MIGRATIONS = (
    """
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE usage (
        "user" TEXT PRIMARY KEY,
        sessions_total BIGINT NOT NULL DEFAULT 0,
        bytes_up BIGINT NOT NULL DEFAULT 0,
        bytes_down BIGINT NOT NULL DEFAULT 0,
        datagrams_up BIGINT NOT NULL DEFAULT 0,
        datagrams_down BIGINT NOT NULL DEFAULT 0,
        last_seen DOUBLE PRECISION
    )
    """,
    """
    CREATE TABLE usage_daily (
        "user" TEXT NOT NULL,
        day TEXT NOT NULL,
        bytes_up BIGINT NOT NULL DEFAULT 0,
        bytes_down BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY ("user", day)
    );
    CREATE TABLE user_limits (
        "user" TEXT PRIMARY KEY,
        max_sessions INTEGER,
        max_session_duration DOUBLE PRECISION,
        rate_up BIGINT,
        rate_down BIGINT,
        quota_day BIGINT,
        quota_month BIGINT
    )
    """,
    # 3: user names in their normalized form (trisocks.usernames), where that is possible.
    lambda cur: rename_legacy_names(cur.execute),
)
"""Step N here is step N of the SQLite store's migrations."""

_PER_USER_TABLES = ("usage", "usage_daily", "user_limits")
_USAGE_COLUMNS = "sessions_total, bytes_up, bytes_down, datagrams_up, datagrams_down, last_seen"


class PostgresStore:
    """A pool of connections to one PostgreSQL database; the schema is migrated on open
    (with *read_only*, for ``trisocks check``: only checked, and every transaction is
    read-only)."""

    TRANSIENT_ERRORS: tuple[type[Exception], ...] = (psycopg.Error, psycopg_pool.PoolTimeout)
    """Errors of the connection, not of the write: the cache keeps such a write queued."""
    REFRESH_INTERVAL = 5.0
    """Seconds between the cache's reloads when no notification asked for one."""

    def __init__(self, url: str, *, read_only: bool = False) -> None:
        kwargs: dict[str, Any] = {"autocommit": True}
        if read_only:
            kwargs["options"] = "-c default_transaction_read_only=on"
        pool = psycopg_pool.ConnectionPool(
            url, min_size=1, max_size=4, kwargs=kwargs, open=False, name="trisocks",
        )
        self.url = url
        self.db = PostgresDatabase(pool)
        try:
            pool.open(wait=True, timeout=CONNECT_TIMEOUT)
            if read_only:
                self._check_schema()
            else:
                migrate(self.db, "store", MIGRATIONS, where=_safe(url))
        except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
            pool.close()
            raise StoreError(f"cannot open database {_safe(url)}: {exc}") from None
        except BaseException:
            pool.close()
            raise

    def _check_schema(self) -> None:
        """Read-only open: refuse a newer schema as :func:`migrate` would, apply nothing."""
        with self.db.transaction() as cur:
            exists = cur.execute("SELECT to_regclass('schema_migrations') IS NOT NULL")[0][0]
            rows = cur.execute("SELECT version FROM schema_migrations WHERE component = ?",
                               ("store",)) if exists else []
        version = rows[0][0] if rows else 0
        if version > len(MIGRATIONS):
            raise schema_error(_safe(self.url), version, len(MIGRATIONS))

    def changed(self) -> bool:
        """Always reload: other instances' writes are announced by NOTIFY, not counted."""
        return True

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Cursor]:
        """A transaction that announces itself on :data:`STORE_CHANNEL` when it commits."""
        with self.db.transaction() as cur:
            cur.execute("SELECT pg_notify(?, '')", (STORE_CHANNEL,))
            yield cur

    # --- users -----------------------------------------------------------------------------

    def add_user(self, name: str, password_hash: str) -> None:
        validate_username(name)
        now = time.time()
        try:
            with self._write() as cur:
                cur.execute("INSERT INTO users (name, password_hash, created_at, updated_at) "
                            "VALUES (?, ?, ?, ?)", (name, password_hash, now, now))
                _forget(cur, name)
        except psycopg.errors.UniqueViolation:
            raise StoreError(f"user {name!r} already exists") from None

    def set_password(self, name: str, password_hash: str) -> None:
        with self._write() as cur:
            if not cur.execute("UPDATE users SET password_hash = ?, updated_at = ? "
                               "WHERE name = ? RETURNING name",
                               (password_hash, time.time(), name)):
                raise StoreError(f"no user {name!r}")

    def remove_user(self, name: str) -> None:
        with self._write() as cur:
            if not cur.execute("DELETE FROM users WHERE name = ? RETURNING name", (name,)):
                raise StoreError(f"no user {name!r}")
            _forget(cur, name)

    def password_hash(self, name: str) -> str | None:
        rows = self._read("SELECT password_hash FROM users WHERE name = ?", (name,))
        return rows[0][0] if rows else None

    def users(self) -> list[str]:
        return [row[0] for row in self._read("SELECT name FROM users ORDER BY name")]

    def has_user(self, name: str) -> bool:
        return self.password_hash(name) is not None

    # --- accounting and limits -------------------------------------------------------------

    def add_usage(self, deltas: Iterable[tuple[str, UsageDelta]]) -> None:
        rows = [(user, d.sessions, d.bytes_up, d.bytes_down, d.datagrams_up, d.datagrams_down,
                 d.last_seen) for user, d in deltas]
        if not rows:
            return
        day, _ = period_starts(time.time())
        with self._write() as cur:
            cur.execute_many(
                f'INSERT INTO usage ("user", {_USAGE_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) '
                'ON CONFLICT ("user") DO UPDATE SET '
                "sessions_total = usage.sessions_total + excluded.sessions_total, "
                "bytes_up = usage.bytes_up + excluded.bytes_up, "
                "bytes_down = usage.bytes_down + excluded.bytes_down, "
                "datagrams_up = usage.datagrams_up + excluded.datagrams_up, "
                "datagrams_down = usage.datagrams_down + excluded.datagrams_down, "
                "last_seen = GREATEST(usage.last_seen, excluded.last_seen)",
                rows,
            )
            cur.execute_many(
                'INSERT INTO usage_daily ("user", day, bytes_up, bytes_down) VALUES (?, ?, ?, ?) '
                'ON CONFLICT ("user", day) DO UPDATE SET '
                "bytes_up = usage_daily.bytes_up + excluded.bytes_up, "
                "bytes_down = usage_daily.bytes_down + excluded.bytes_down",
                [(row[0], day, row[2], row[3]) for row in rows if row[2] or row[3]],
            )

    def bytes_since(self, user: str, day: str) -> int:
        rows = self._read('SELECT COALESCE(SUM(bytes_up + bytes_down), 0) FROM usage_daily '
                          'WHERE "user" = ? AND day >= ?', (user, day))
        return int(rows[0][0])

    def user_limits(self, name: str) -> UserLimits:
        rows = self._read(f'SELECT {", ".join(LIMIT_FIELDS)} FROM user_limits WHERE "user" = ?',
                          (name,))
        return UserLimits(*rows[0]) if rows else UserLimits()

    def set_user_limits(self, name: str, limits: UserLimits) -> None:
        columns = ", ".join(LIMIT_FIELDS)
        updates = ", ".join(f"{f} = excluded.{f}" for f in LIMIT_FIELDS)
        with self._write() as cur:
            if not is_external(name) and not cur.execute(
                    "SELECT 1 FROM users WHERE name = ? FOR UPDATE", (name,)):
                raise StoreError(f"no user {name!r}")
            cur.execute(
                f'INSERT INTO user_limits ("user", {columns}) '
                f"VALUES (?{', ?' * len(LIMIT_FIELDS)}) "
                f'ON CONFLICT ("user") DO UPDATE SET {updates}',
                (name, *(getattr(limits, f) for f in LIMIT_FIELDS)),
            )

    def usage(self, name: str | None = None) -> list[UserUsage]:
        with self.db.transaction() as cur:
            rows = _usage(cur)
        return sorted((u for u in rows.values() if name in (None, u.user)),
                      key=lambda u: u.user)

    def snapshot(self, since_day: str) -> Snapshot:
        """Users, limits and totals, and per-day bytes from *since_day* on, in one
        consistent read."""
        with self.db.transaction() as cur:
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            passwords: dict[str, str] = dict(
                cur.execute("SELECT name, password_hash FROM users"))
            limits = {row[0]: UserLimits(*row[1:]) for row in cur.execute(
                f'SELECT "user", {", ".join(LIMIT_FIELDS)} FROM user_limits')}
            usage = _usage(cur)
            daily: dict[str, dict[str, int]] = {}
            for user, day, total in cur.execute(
                'SELECT "user", day, bytes_up + bytes_down FROM usage_daily WHERE day >= ?',
                (since_day,),
            ):
                daily.setdefault(user, {})[day] = int(total)
        return Snapshot(passwords, limits, usage, daily)

    def notify(self, channel: str, payload: str) -> None:
        """NOTIFY *channel* (the fleet's kill requests travel this way)."""
        with self.db.transaction() as cur:
            cur.execute("SELECT pg_notify(?, ?)", (channel, payload))

    def _read(self, sql: str, params: tuple[str, ...] = ()) -> list[tuple[Any, ...]]:
        with self.db.transaction() as cur:
            return cur.execute(sql, params)


def _forget(cur: Cursor, name: str) -> None:
    """A removed (or re-added) user starts from nothing, as in the SQLite store."""
    for table in _PER_USER_TABLES:
        cur.execute(f'DELETE FROM {table} WHERE "user" = ?', (name,))


def _usage(cur: Cursor) -> dict[str, UserUsage]:
    """Totals of every user (zero for those without any yet) and of anonymous sessions."""
    usage = {name: UserUsage(name, 0, 0, 0, 0, 0, None)
             for (name,) in cur.execute("SELECT name FROM users")}
    usage.update((row[0], UserUsage(*row))
                 for row in cur.execute(f'SELECT "user", {_USAGE_COLUMNS} FROM usage'))
    return usage


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    info = psycopg.conninfo.conninfo_to_dict(url)
    return f"postgresql://{info.get('user', '')}@{info.get('host', '')}/{info.get('dbname', '')}"
