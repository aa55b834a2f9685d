"""The embedded store: users and per-user accounting in one SQLite file.

Schema changes are numbered migrations applied at open; a database with a newer or unknown
schema is refused with one line (:func:`schema_error`), read-only opens included. The file
runs in WAL mode so the CLI can add users while a server is running. Calls are short, indexed
single-row statements; the one slow operation, password hashing, happens outside (see
:mod:`trisocks.passwords`). The server never calls them on the trio loop: a write can wait up
to ``busy_timeout`` for another process's lock (:mod:`trisocks.store.cache`).

Files: a data directory the store creates is 0700, a database file it creates 0600 whatever
the umask (SQLite gives ``-wal`` and ``-shm`` the database's mode); an existing database that
its group or others may read is opened with a warning naming it (:func:`warn_if_readable`).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from trisocks.policy.quotas import LIMIT_FIELDS, UserLimits, period_starts
from trisocks.store.files import create_private, warn_if_readable
from trisocks.store.legacy import PER_USER_TABLES, rename_legacy_names
from trisocks.store.records import (
    Snapshot,
    StoreError,
    UsageDelta,
    UserUsage,
    is_external,
    schema_error,
    validate_username,
)

__all__ = ["Store"]

log = logging.getLogger("trisocks.store")


_MIGRATIONS: tuple[str | Callable[[sqlite3.Connection], None], ...] = (
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
    # 3: user names in their normalized form (trisocks.usernames), where that is possible.
    lambda db: rename_legacy_names(lambda sql, params=(): db.execute(sql, params).fetchall()),
)

class Store:
    """A handle on the SQLite file. Not thread-safe: use it from one thread at a time (the
    CLI; the server reaches it only through :class:`trisocks.store.cache.CachedStore`, from
    worker threads, so a lock held by another process never stalls the trio loop)."""

    TRANSIENT_ERRORS: tuple[type[Exception], ...] = (sqlite3.Error,)
    """Errors a later try may not get (the write lock is held elsewhere: ``database is
    locked``); a write that fails with one stays queued in the cache."""
    REFRESH_INTERVAL = 0.5
    """Seconds between the cache's checks for other processes' writes (:meth:`changed`)."""

    def __init__(
        self, path: Path | str, *, create_dir: bool = False, read_only: bool = False
    ) -> None:
        """Open (creating it if need be) and migrate *path*. With *read_only* (``trisocks
        check``), open an existing file without ever writing to it: SQLite's ``mode=ro``, and
        migrations are left to the server."""
        path = Path(path)
        if not path.parent.is_dir():
            if not create_dir or read_only:
                raise StoreError(f"database directory {path.parent} does not exist")
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            path.parent.chmod(0o700)  # mkdir's mode is masked by the umask
        self.path = path
        self.read_only = read_only
        warn_if_readable(path)
        try:
            if not read_only:
                create_private(path)  # SQLite gives -wal and -shm the database's mode
        except OSError as exc:
            raise StoreError(f"cannot create database {path}: {exc.strerror}") from None
        try:
            if read_only:
                uri = f"{path.absolute().as_uri()}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, isolation_level=None,
                                           check_same_thread=False)
            else:
                self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute("PRAGMA busy_timeout=2000")
            self._migrate()
        except BaseException as exc:
            opened = getattr(self, "_db", None)
            if opened is not None:
                opened.close()
            if isinstance(exc, sqlite3.Error):
                raise StoreError(f"cannot open database {path}: {exc}") from None
            raise

    def close(self) -> None:
        self._db.close()

    def snapshot(self, since_day: str) -> Snapshot:
        """Users, limits and totals, and per-day bytes from *since_day* on, in one
        consistent read (WAL: never waits for a writer)."""
        db = self._db
        db.execute("BEGIN")
        try:
            self._data_version = db.execute("PRAGMA data_version").fetchone()[0]
            passwords = dict(db.execute("SELECT name, password_hash FROM users").fetchall())
            limits = {row[0]: UserLimits(*row[1:]) for row in db.execute(
                f"SELECT user, {', '.join(LIMIT_FIELDS)} FROM user_limits")}
            usage = {u.user: u for u in self.usage()}
            daily: dict[str, dict[str, int]] = {}
            for user, day, total in db.execute(
                "SELECT user, day, bytes_up + bytes_down FROM usage_daily WHERE day >= ?",
                (since_day,),
            ):
                daily.setdefault(user, {})[day] = int(total)
        finally:
            db.execute("COMMIT")
        return Snapshot(passwords, limits, usage, daily)

    def changed(self) -> bool:
        """Whether another connection committed since the last :meth:`snapshot`."""
        (version,) = self._db.execute("PRAGMA data_version").fetchone()
        return bool(version != getattr(self, "_data_version", None))

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
        """Apply the migrations not applied yet. A newer schema, or one that is not ours
        (tables of another program, a negative version), is refused with one line
        (:func:`schema_error`), read-only or not."""
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version > len(_MIGRATIONS) or version < 0:
            raise schema_error(str(self.path), version, len(_MIGRATIONS))
        if version == 0:
            foreign = [name for (name,) in self._db.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'fleet_%' "
                "AND name NOT IN ('schema_migrations') AND name NOT LIKE 'sqlite_%'")]
            if foreign:
                raise StoreError(f"database {self.path} has schema version 0 but tables "
                                 f"({', '.join(sorted(foreign)[:5])}): not a trisocks database")
        pending = () if self.read_only else _MIGRATIONS[version:]
        for number, script in enumerate(pending, start=version + 1):
            with self._transaction():
                if callable(script):
                    self._db.execute("BEGIN IMMEDIATE")
                    script(self._db)
                else:
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
        for table in PER_USER_TABLES:
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
            if not is_external(name) and not self.has_user(name):
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

