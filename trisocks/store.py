"""The embedded store: users and per-user accounting in one SQLite file.

Schema changes are numbered migrations applied at open. The file runs in WAL mode so the CLI
can add users while a server is running. Calls are short, indexed single-row statements; the
one slow operation, password hashing, happens outside (see :mod:`trisocks.passwords`).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path

import attrs

from trisocks.policy.quotas import LIMIT_FIELDS, UserLimits, period_starts

__all__ = ["ANONYMOUS", "Store", "StoreError", "UsageDelta", "UserUsage", "validate_username"]

ANONYMOUS = "(anonymous)"
"""The name sessions without authentication are accounted under; no user can take it."""

_MIGRATIONS = (
    """
    CREATE TABLE users (
        name TEXT PRIMARY KEY,
        password_hash TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL
    );
    CREATE TABLE usage (
        user TEXT PRIMARY KEY,
        sessions_total INTEGER NOT NULL DEFAULT 0,
        bytes_up INTEGER NOT NULL DEFAULT 0,
        bytes_down INTEGER NOT NULL DEFAULT 0,
        datagrams_up INTEGER NOT NULL DEFAULT 0,
        datagrams_down INTEGER NOT NULL DEFAULT 0,
        last_seen REAL
    );
    """,
    # 2: per-day usage (quotas by day and month) and per-user limits (trisocks.policy.quotas).
    """
    CREATE TABLE usage_daily (
        user TEXT NOT NULL,
        day TEXT NOT NULL,
        bytes_up INTEGER NOT NULL DEFAULT 0,
        bytes_down INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (user, day)
    );
    CREATE TABLE user_limits (
        user TEXT PRIMARY KEY,
        max_sessions INTEGER,
        max_session_duration REAL,
        rate_up INTEGER,
        rate_down INTEGER,
        quota_day INTEGER,
        quota_month INTEGER
    );
    """,
)
_PER_USER_TABLES = ("usage", "usage_daily", "user_limits")
"""Rows keyed by user name: a removed (or re-added) user starts from nothing."""


class StoreError(Exception):
    """A user-facing problem with the store (duplicate user, unknown user, bad name)."""


def validate_username(name: str) -> str:
    """Names are 1..255 UTF-8 bytes (RFC 1929 ULEN), without control characters."""
    raw = name.encode()
    if not raw:
        raise StoreError("user name must not be empty")
    if len(raw) > 255:
        raise StoreError(f"user name is {len(raw)} bytes; RFC 1929 allows at most 255")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise StoreError("user name must not contain control characters")
    if name == ANONYMOUS:
        raise StoreError(f"{ANONYMOUS} is reserved for unauthenticated sessions")
    return name


@attrs.frozen
class UsageDelta:
    """Counters to add to one user's totals."""

    sessions: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    datagrams_up: int = 0
    datagrams_down: int = 0
    last_seen: float | None = None


@attrs.frozen
class UserUsage:
    """Persisted totals for one user."""

    user: str
    sessions_total: int
    bytes_up: int
    bytes_down: int
    datagrams_up: int
    datagrams_down: int
    last_seen: float | None


class Store:
    """A handle on the SQLite file. Not thread-safe: use it from one thread (the trio loop)."""

    def __init__(self, path: Path | str, *, create_dir: bool = False) -> None:
        path = Path(path)
        if not path.parent.is_dir():
            if not create_dir:
                raise StoreError(f"database directory {path.parent} does not exist")
            path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=2000")
            self._migrate()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open database {path}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def read_all(self) -> tuple[list[UserUsage], list[str]]:
        """Every user's totals and every user name, on a connection of its own.

        For a worker thread: listing thousands of users takes long enough (about 0.1 s for
        20,000) to stall every session if it ran on the trio loop. WAL lets this reader run
        beside the loop's writes.
        """
        reader = Store(self.path)
        try:
            return reader.usage(), reader.users()
        finally:
            reader.close()

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        for number, script in enumerate(_MIGRATIONS[version:], start=version + 1):
            with self._transaction():
                self._db.executescript(f"BEGIN; {script}")
                self._db.execute(f"PRAGMA user_version = {number}")

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)

    # --- users -----------------------------------------------------------------------------

    def add_user(self, name: str, password_hash: str) -> None:
        validate_username(name)
        now = time.time()
        try:
            with self._transaction():
                self._db.execute("BEGIN IMMEDIATE")
                self._db.execute(
                    "INSERT INTO users (name, password_hash, created_at, updated_at) "
                    "VALUES (?, ?, ?, ?)",
                    (name, password_hash, now, now),
                )
                self._forget(name)
        except sqlite3.IntegrityError:
            raise StoreError(f"user {name!r} already exists") from None

    def set_password(self, name: str, password_hash: str) -> None:
        cursor = self._db.execute(
            "UPDATE users SET password_hash = ?, updated_at = ? WHERE name = ?",
            (password_hash, time.time(), name),
        )
        if cursor.rowcount == 0:
            raise StoreError(f"no user {name!r}")

    def remove_user(self, name: str) -> None:
        with self._transaction():
            self._db.execute("BEGIN IMMEDIATE")
            cursor = self._db.execute("DELETE FROM users WHERE name = ?", (name,))
            if cursor.rowcount == 0:
                raise StoreError(f"no user {name!r}")
            self._forget(name)

    def _forget(self, name: str) -> None:
        for table in _PER_USER_TABLES:
            self._db.execute(f"DELETE FROM {table} WHERE user = ?", (name,))

    def password_hash(self, name: str) -> str | None:
        row = self._db.execute(
            "SELECT password_hash FROM users WHERE name = ?", (name,)
        ).fetchone()
        return row[0] if row else None

    def users(self) -> list[str]:
        return [row[0] for row in self._db.execute("SELECT name FROM users ORDER BY name")]

    def has_user(self, name: str) -> bool:
        return self.password_hash(name) is not None

    # --- accounting ------------------------------------------------------------------------

    def add_usage(self, deltas: Iterable[tuple[str, UsageDelta]]) -> None:
        """Add counters to users' totals in one transaction."""
        rows = [
            (user, d.sessions, d.bytes_up, d.bytes_down, d.datagrams_up, d.datagrams_down,
             d.last_seen)
            for user, d in deltas
        ]
        if not rows:
            return
        with self._transaction():
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                """
                INSERT INTO usage (user, sessions_total, bytes_up, bytes_down, datagrams_up,
                                   datagrams_down, last_seen)
                VALUES (?, ?, ?, ?, ?, ?, ?)
                ON CONFLICT(user) DO UPDATE SET
                    sessions_total = sessions_total + excluded.sessions_total,
                    bytes_up = bytes_up + excluded.bytes_up,
                    bytes_down = bytes_down + excluded.bytes_down,
                    datagrams_up = datagrams_up + excluded.datagrams_up,
                    datagrams_down = datagrams_down + excluded.datagrams_down,
                    last_seen = MAX(COALESCE(last_seen, 0), COALESCE(excluded.last_seen, 0))
                """,
                rows,
            )
            day, _ = period_starts(time.time())
            self._db.executemany(
                """
                INSERT INTO usage_daily (user, day, bytes_up, bytes_down) VALUES (?, ?, ?, ?)
                ON CONFLICT(user, day) DO UPDATE SET
                    bytes_up = bytes_up + excluded.bytes_up,
                    bytes_down = bytes_down + excluded.bytes_down
                """,
                [(row[0], day, row[2], row[3]) for row in rows if row[2] or row[3]],
            )

    def bytes_since(self, user: str, day: str) -> int:
        """Payload bytes (both directions) *user* moved from UTC *day* (``YYYY-MM-DD``) on."""
        (total,) = self._db.execute(
            "SELECT COALESCE(SUM(bytes_up + bytes_down), 0) FROM usage_daily "
            "WHERE user = ? AND day >= ?",
            (user, day),
        ).fetchone()
        return int(total)

    # --- per-user limits -------------------------------------------------------------------

    def user_limits(self, name: str) -> UserLimits:
        """*name*'s own limits (all ``None`` when none are set)."""
        row = self._db.execute(
            f"SELECT {', '.join(LIMIT_FIELDS)} FROM user_limits WHERE user = ?", (name,)
        ).fetchone()
        return UserLimits(*row) if row else UserLimits()

    def set_user_limits(self, name: str, limits: UserLimits) -> None:
        """Replace *name*'s limits.

        Raises:
            StoreError: no such user.
        """
        with self._transaction():
            self._db.execute("BEGIN IMMEDIATE")
            if not self.has_user(name):
                raise StoreError(f"no user {name!r}")
            values = [getattr(limits, f) for f in LIMIT_FIELDS]
            self._db.execute(
                f"INSERT OR REPLACE INTO user_limits (user, {', '.join(LIMIT_FIELDS)}) "
                f"VALUES (?{', ?' * len(LIMIT_FIELDS)})",
                (name, *values),
            )

    def usage(self, name: str | None = None) -> list[UserUsage]:
        """Totals of every user (and of anonymous sessions), or of one."""
        # One user's filter goes inside both arms: SQLite does not push a WHERE on the union
        # down into it, and would scan both tables for a single-row answer on the trio loop.
        names = "SELECT name FROM users UNION SELECT user FROM usage"
        params: tuple[str, ...] = ()
        if name is not None:
            names = ("SELECT name FROM users WHERE name = ? "
                     "UNION SELECT user FROM usage WHERE user = ?")
            params = (name, name)
        query = f"""
            SELECT names.name, COALESCE(u.sessions_total, 0), COALESCE(u.bytes_up, 0),
                   COALESCE(u.bytes_down, 0), COALESCE(u.datagrams_up, 0),
                   COALESCE(u.datagrams_down, 0), u.last_seen
            FROM ({names}) AS names
            LEFT JOIN usage AS u ON u.user = names.name
            ORDER BY 1
        """
        return [UserUsage(*row) for row in self._db.execute(query, params)]


class _Transaction:
    """``BEGIN`` is issued by the caller; this commits on success and rolls back on error."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: object, *_: object) -> None:
        if not self._db.in_transaction:
            return
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")

