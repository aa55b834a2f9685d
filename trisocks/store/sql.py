"""One small SQL surface over SQLite (``sqlite3``) and PostgreSQL (a psycopg pool), and
versioned migrations for both.

The fleet tables are written once, in the SQL both engines share (``?`` placeholders,
``ON CONFLICT ... DO UPDATE``, ``BIGINT``/``DOUBLE PRECISION`` columns); the PostgreSQL side
rewrites the placeholders. Every call blocks: the server makes them from worker threads
(``trio.to_thread``), never on the trio loop.

Migrations are numbered per *component* in ``schema_migrations``, so the fleet tables and the
PostgreSQL user tables evolve independently of each other (the SQLite user tables keep their
own ``PRAGMA user_version``, :mod:`trisocks.store`). Applying them takes an exclusive lock, so
two workers starting at once apply each step once.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from trisocks.store.records import StoreError

if TYPE_CHECKING:
    import psycopg_pool

__all__ = ["Cursor", "Database", "PostgresDatabase", "SqliteDatabase", "migrate"]

Row = tuple[Any, ...]


class Cursor(Protocol):
    """Statements inside one transaction."""

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]: ...
    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


class Database(Protocol):
    def transaction(self, *, exclusive: bool = False) -> contextlib.AbstractContextManager[Cursor]:
        """Commit when the block ends, roll back if it raises. *exclusive*: one such
        transaction at a time across every process on this database."""
        ...

    def close(self) -> None: ...


class _SqliteCursor:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._db.execute(sql, params).fetchall()

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        self._db.executemany(sql, rows)


class SqliteDatabase:
    """Its own connection to the store's file (WAL), used by one thread at a time."""

    def __init__(self, path: Path) -> None:
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout=5000")  # a worker thread may wait; the loop not
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def transaction(self, *, exclusive: bool = False) -> Iterator[Cursor]:
        # IMMEDIATE takes the write lock up front: every fleet transaction writes or must
        # see a stable picture, and a deferred one could fail to upgrade halfway (SQLITE_BUSY).
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield _SqliteCursor(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()


class _PostgresCursor:
    def __init__(self, cursor: Any) -> None:
        self._cursor = cursor

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        self._cursor.execute(sql.replace("?", "%s"), params)
        return self._cursor.fetchall() if self._cursor.description else []

    def execute_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._cursor.executemany(sql.replace("?", "%s"), rows)


_LOCK_KEY = 0x7472_6973  # "tris": the advisory lock exclusive transactions take
"""Schema changes by several instances starting at once are serialized on it."""


class PostgresDatabase:
    """A psycopg connection pool; each transaction borrows one connection."""

    def __init__(self, pool: psycopg_pool.ConnectionPool) -> None:
        self.pool = pool

    @contextlib.contextmanager
    def transaction(self, *, exclusive: bool = False) -> Iterator[Cursor]:
        with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cursor:
            if exclusive:
                cursor.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            yield _PostgresCursor(cursor)

    def close(self) -> None:
        self.pool.close()


Step = str | Callable[[Cursor], None]


def migrate(db: Database, component: str, steps: Sequence[Step], *, where: str = "") -> int:
    """Apply the *steps* of *component* not applied yet; return the schema version.

    Steps are append-only: step N, once released, never changes (a database that has it
    would not get the change). Statements are separated by ``;``, which no step may use
    elsewhere. A step may also be a function, run with the migration's cursor (data
    changes DDL cannot express). *where* names the database in messages.

    Raises:
        StoreError: the database has a newer schema than this program knows.
    """
    with db.transaction(exclusive=True) as cur:
        cur.execute("CREATE TABLE IF NOT EXISTS schema_migrations ("
                    "component TEXT PRIMARY KEY, version INTEGER NOT NULL)")
        rows = cur.execute("SELECT version FROM schema_migrations WHERE component = ?",
                           (component,))
        version = rows[0][0] if rows else 0
        if version > len(steps):
            raise StoreError(f"database {where + ' ' if where else ''}has {component} schema "
                             f"version {version}, this trisocks knows up to {len(steps)}: "
                             "upgrade trisocks")
        for step in steps[version:]:
            if callable(step):
                step(cur)
                continue
            for statement in filter(str.strip, step.split(";")):
                cur.execute(statement)
        cur.execute("INSERT INTO schema_migrations (component, version) VALUES (?, ?) "
                    "ON CONFLICT (component) DO UPDATE SET version = excluded.version",
                    (component, len(steps)))
    return len(steps)
