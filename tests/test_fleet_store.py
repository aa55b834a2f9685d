"""The store interface on both backends, the PostgreSQL schema and migrations, the server's
cached view of PostgreSQL, and the session directory (real PostgreSQL: tests/fleet_support.py).
"""

from __future__ import annotations

import datetime
import logging
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.fleet_support import pg_url, postgres
from tests.session_support import session_from_text
from trisocks.fleet.directory import STALE_AFTER, Directory, Instance
from trisocks.policy.quotas import UserLimits
from trisocks.sessions import SessionView
from trisocks.store.cache import CachedStore
from trisocks.store.interface import UserStore
from trisocks.store.open import open_store
from trisocks.store.postgres import PostgresStore
from trisocks.store.records import ANONYMOUS, StoreError, UsageDelta, UserUsage
from trisocks.store.sql import SqliteDatabase, migrate
from trisocks.store.sqlite import Store

__all__ = ["pg_url", "postgres"]  # fixtures used by name

TODAY = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d")


@pytest.fixture(params=["sqlite", "postgresql"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[UserStore]:
    db = str(tmp_path / "s.db") if request.param == "sqlite" else request.getfixturevalue("pg_url")
    store = open_store(db)
    yield store
    store.close()


def test_both_backends_behave_alike(any_store: UserStore) -> None:
    s = any_store
    s.add_user("bob", "hash-1")
    with pytest.raises(StoreError, match="already exists"):
        s.add_user("bob", "hash-2")
    with pytest.raises(StoreError, match="no user"):
        s.set_password("nobody", "x")
    with pytest.raises(StoreError, match="no user"):
        s.set_user_limits("nobody", UserLimits())
    s.set_password("bob", "hash-3")
    assert (s.password_hash("bob"), s.users(), s.has_user("carol")) == ("hash-3", ["bob"], False)
    for _ in range(2):
        s.add_usage([("bob", UsageDelta(1, 10, 20, 1, 2, 5.0)),
                     (ANONYMOUS, UsageDelta(1, 1, 1, 0, 0, 7.0))])
    assert s.usage("bob") == [UserUsage("bob", 2, 20, 40, 2, 4, 5.0)]
    assert [u.user for u in s.usage()] == [ANONYMOUS, "bob"]
    assert (s.bytes_since("bob", TODAY), s.bytes_since("bob", "9999-01-01")) == (60, 0)
    s.set_user_limits("bob", UserLimits(max_sessions=3, quota_day=10**10))
    assert s.user_limits("bob") == UserLimits(max_sessions=3, quota_day=10**10)
    s.remove_user("bob")
    s.add_user("bob", "hash-4")  # a re-added user starts from nothing
    assert s.usage("bob") == [UserUsage("bob", 0, 0, 0, 0, 0, None)]
    assert s.user_limits("bob") == UserLimits()


def test_sqlite_reads_of_one_user_are_indexed_lookups(tmp_path: Path) -> None:
    """The server reads one user's row on the trio loop: it must not scan every user."""
    store = Store(tmp_path / "s.db")
    traced: list[str] = []
    store._db.set_trace_callback(traced.append)
    assert store.usage("bob") == []
    store._db.set_trace_callback(None)
    (query,) = traced
    plan = [row[3] for row in store._db.execute(f"EXPLAIN QUERY PLAN {query}")]
    store.close()
    assert not [step for step in plan if step.startswith("SCAN") and "names" not in step], plan


def test_postgres_schema_matches_sqlite(tmp_path: Path, pg_url: str) -> None:
    Store(tmp_path / "s.db").close()
    PostgresStore(pg_url).close()
    with sqlite3.connect(tmp_path / "s.db") as lite:
        tables = [row[0] for row in lite.execute(
            "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        expected = {t: [c[1] for c in lite.execute(f"PRAGMA table_info({t})")] for t in tables}
    lite.close()
    with psycopg.connect(pg_url) as pg:
        got = {t: [row[0] for row in pg.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = %s "
            "ORDER BY ordinal_position", (t,))] for t in tables}
    assert got == expected


def test_migrations_are_versioned_and_refuse_a_newer_schema(tmp_path: Path, pg_url: str) -> None:
    for _ in range(2):  # the second open applies nothing
        PostgresStore(pg_url).close()
    store = PostgresStore(pg_url)
    try:
        Directory(store.db)
        with store.db.transaction() as cur:
            assert dict(cur.execute("SELECT component, version FROM schema_migrations")) == {
                "store": 3, "fleet": 4}
        with pytest.raises(StoreError, match="fleet schema version 4, this trisocks knows up"):
            migrate(store.db, "fleet", ())
    finally:
        store.close()
    lite = SqliteDatabase(tmp_path / "s.db")
    try:
        assert migrate(lite, "fleet", ("CREATE TABLE a (x INTEGER)",)) == 1
        assert migrate(lite, "fleet", ("CREATE TABLE a (x INTEGER)", "DROP TABLE a")) == 2
        with lite.transaction() as cur:
            assert cur.execute("SELECT name FROM sqlite_master WHERE name = 'a'") == []
    finally:
        lite.close()


async def test_cache_serves_own_writes_at_once_and_others_after_sync(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    cache, other = CachedStore(PostgresStore(pg_url)), PostgresStore(pg_url)
    try:
        cache.add_user("carol", "h-carol")
        cache.add_usage([("carol", UsageDelta(1, 100, 200))])
        assert cache.has_user("carol") and cache.bytes_since("carol", TODAY) == 300
        assert not other.has_user("carol")  # written behind
        await cache.sync()
        assert other.usage("carol")[0].bytes_down == 200

        other.add_user("dave", "h-dave")
        other.add_user("erin", "h-erin-first")
        assert not cache.has_user("dave")
        cache.add_user("erin", "h-erin-late")  # the cache does not know erin yet
        cache.add_usage([("carol", UsageDelta(0, 1, 1))])  # queued, re-applied after reload
        with caplog.at_level(logging.WARNING, "trisocks.fleet"):
            await cache.sync()
        assert "add user 'erin' refused: user 'erin' already exists" in caplog.text
        assert cache.has_user("dave") and cache.password_hash("erin") == "h-erin-first"
        assert cache.usage("carol")[0].bytes_up == other.usage("carol")[0].bytes_up == 101
    finally:
        cache.close()
        other.close()


def test_close_sends_what_is_still_queued(pg_url: str) -> None:
    cache = CachedStore(PostgresStore(pg_url))
    cache.add_user("frank", "h")
    cache.close()  # as at shutdown: the trio loop has ended, nothing synced
    store = PostgresStore(pg_url)
    try:
        assert store.has_user("frank")
    finally:
        store.close()


def _row(instance: str, session_id: str) -> SessionView:
    session = session_from_text(session_id, "192.0.2.1:4000", user="bob", command="CONNECT",
                                target="example:443", state="relaying", started_at=1.0,
                                instance=instance)
    session.counters.bytes_up, session.counters.bytes_down = 1, 2
    return session.view()


def test_directory_carries_the_identity_source(tmp_path: Path) -> None:
    Store(tmp_path / "s.db").close()
    db = SqliteDatabase(tmp_path / "s.db")
    try:
        directory = Directory(db)
        a = Instance("host/1", "trisocks/host/1")
        external = session_from_text("s1", "[2001:db8::1]:4000", user="ldap:alice",
                                     source="ldap", groups=frozenset({"staff"}),
                                     command="CONNECT", target="example:443",
                                     state="relaying", started_at=1.0, instance=a.id).view()
        anonymous = session_from_text("s2", "192.0.2.1:4001", started_at=2.0,
                                      instance=a.id).view()
        directory.publish(a, 0.0, [external, anonymous], now=100.0)
        remote = {v.id: v for v in directory.sessions(101.0, besides="host/2")}
        assert remote == {"s1": external, "s2": anonymous}
        assert (remote["s1"].user, remote["s1"].source, remote["s2"].source) == (
            "ldap:alice", "ldap", None)
    finally:
        db.close()


def test_directory_trusts_fresh_heartbeats_only(tmp_path: Path) -> None:
    Store(tmp_path / "s.db").close()
    db = SqliteDatabase(tmp_path / "s.db")
    try:
        directory = Directory(db)
        a, b = Instance("host/1", "trisocks/host/1"), Instance("host/2", "trisocks/host/2")
        directory.publish(a, 0.0, [_row(a.id, "s1")], now=100.0)
        directory.publish(b, 0.0, [_row(b.id, "s2"), _row(b.id, "s3")], now=100.0)
        assert [r.id for r in directory.sessions(101.0, besides=b.id)] == ["s1"]
        assert directory.owner("s2", 101.0, besides=a.id) == b
        assert directory.owner("s2", 101.0, besides=b.id) is None  # its own: not remote

        directory.publish(b, 0.0, [_row(b.id, "s3")], now=100.0 + STALE_AFTER + 1)
        later = 100.0 + STALE_AFTER + 1
        assert directory.sessions(later, besides="x") == [_row(b.id, "s3")]  # a is stale
        assert directory.owner("s1", later, besides="x") is None
        with db.transaction() as cur:  # and the publish has deleted a's rows
            assert cur.execute("SELECT instance FROM fleet_instances") == [(b.id,)]
        directory.retire(b.id)
        assert directory.sessions(later, besides="x") == []
    finally:
        db.close()


def test_cli_manages_users_on_postgresql(pg_url: str) -> None:
    def trisocks(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "trisocks", *args, "--db", pg_url],
                              input=stdin, capture_output=True, text=True, timeout=60)

    assert trisocks("user", "add", "gina", "--password-stdin", stdin="pw-gina\n").returncode == 0
    assert trisocks("user", "limits", "gina", "--quota-day", "5G").returncode == 0
    assert trisocks("user", "list").stdout == "gina\n"
    duplicate = trisocks("user", "add", "gina", "--password-stdin", stdin="again\n")
    assert (duplicate.returncode, duplicate.stderr.strip()) == (
        2, "trisocks: error: user 'gina' already exists")
