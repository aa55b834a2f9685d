"""The user store's hardening (issue 12): one spelling per user name (RFC 8265, one script),
private files whatever the umask, a store that never stalls the event loop while another
process holds SQLite's write lock, and one line for a schema this trisocks does not know.

Real SQLite files, a real PostgreSQL (tests/fleet_support.py), real subprocesses for the CLI
and for the process holding the lock.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sqlite3
import stat
import subprocess
import sys
import textwrap
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from tests.admin_support import ADMIN, TOKEN, admin_url, echo_round
from tests.conftest import make_config
from tests.fleet_support import pg_url, postgres
from trisocks.admin.server import serve_with_admin
from trisocks.admin.tokens import token_path
from trisocks.cli.main import main
from trisocks.client.connect import open_socks_stream
from trisocks.identity.store import Authenticator
from trisocks.passwords import hash_password
from trisocks.store.cache import CachedStore
from trisocks.store.open import open_store
from trisocks.store.postgres import PostgresStore
from trisocks.store.records import StoreError, UsageDelta
from trisocks.store.sqlite import _MIGRATIONS, Store
from trisocks.usernames import login_form, normalize_username, scripts_of

__all__ = ["pg_url", "postgres"]  # fixtures used by name

KNOWN = len(_MIGRATIONS)


def run_cli(*args: str, stdin: str = "", env: dict[str, str] | None = None,
            umask: int = -1) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "trisocks", *args], input=stdin, capture_output=True, text=True,
        timeout=60, env={**os.environ, **(env or {})}, umask=umask, check=False,
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- (a) user names ------------------------------------------------------------------------

# Each of these was a user of its own before: now it is "alice" (or refused).
SAME_AS = [
    ("Alice", "alice"),  # UsernameCaseMapped: case folds
    ("ALICE", "alice"),
    ("\uff21\uff4c\uff49\uff43\uff45", "alice"),  # full-width
    ("cafe\u0301", "caf\u00e9"),  # NFD -> NFC
    ("caf\u00e9", "caf\u00e9"),
    ("\uff80\uff9b\uff73", "\u30bf\u30ed\u30a6"),  # half-width katakana
]

REFUSED = [
    ("\u0430lice", "mixes scripts (Cyrillic, Latin)"),  # Cyrillic a
    ("p\u0430yp\u0430l", "mixes scripts"),
    ("\u03bfpen", "mixes scripts (Greek, Latin)"),  # Greek omicron
    ("\u0441\u03bf\u0441", "mixes scripts (Cyrillic, Greek)"),
    ("\ud55c\u3072", "mixes scripts"),  # Hangul + Hiragana: neither Japanese nor Korean
    ("al\u200bice", "U+200B"),  # zero-width space
    ("al\u200dice", "U+200D"),  # zero-width joiner
    ("\u202ealice", "U+202E"),  # bidi override
    ("alice\u2066", "U+2066"),  # bidi isolate
    ("alice ", "spaces"),  # trailing space
    (" alice", "spaces"),
    ("ali ce", "spaces"),
    ("alice\t", "U+0009"),
    ("(other)", "reserved"),
    ("(anonymous)", "reserved"),
    ("(", "reserved"),
    ("\uff08x\uff09", "reserved"),  # full-width parentheses map to "(x)"
    ("", "empty"),
    ("a" * 256, "at most 255"),
]

ALLOWED = [
    "alice", "bob.smith", "user_42", "j-doe", "\u0430\u043b\u0438\u0441\u0430",  # Cyrillic
    "\u03b1\u03bb\u03af\u03ba\u03b7",  # Greek
    "tanaka\u592a\u90ce", "\u305f\u306a\u304b\u30bf\u30ca\u30ab\u7530\u4e2d",  # Japanese
    "kim\uae40\ucca0\uc218\u91d1",  # Korean with Han
    "\u738b\u3105\u3106",  # Han + Bopomofo
    "\u0645\u062d\u0645\u062f",  # Arabic
    "a" * 255,
]


@pytest.mark.parametrize(("name", "normal"), SAME_AS)
def test_variants_normalize_to_one_user(name: str, normal: str) -> None:
    assert normalize_username(name) == normal
    assert login_form(name) in (None, normal)


@pytest.mark.parametrize(("name", "why"), REFUSED)
def test_confusable_and_reserved_names_are_refused(name: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        normalize_username(name)


@pytest.mark.parametrize("name", ALLOWED)
def test_single_script_and_cjk_mixes_are_allowed(name: str) -> None:
    assert normalize_username(name) == unicodedata.normalize("NFC", name)


@pytest.mark.parametrize(("name", "scripts"), [
    ("alice", {"Latin"}), ("\u0430lice", {"Cyrillic", "Latin"}), ("user_1", {"Latin"}),
    ("42", set()), ("tanaka\u592a", {"Han", "Latin"}),
])
def test_scripts_of(name: str, scripts: set[str]) -> None:
    assert scripts_of(name) == scripts


@given(st.text(min_size=1, max_size=40))
def test_normalizing_is_idempotent_and_keeps_the_rules(text: str) -> None:
    try:
        normal = normalize_username(text)
    except ValueError:
        return
    assert normalize_username(normal) == normal
    assert login_form(normal) is None  # already normal: a login looks it up as sent
    assert not normal.startswith("(") and 1 <= len(normal.encode()) <= 255


@pytest.mark.parametrize(("name", "why"), REFUSED)
def test_cli_refuses_with_one_line_and_status_2(
    tmp_path: Path, name: str, why: str, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "t.db"
    with pytest.raises(SystemExit) as exit_:
        main(["user", "add", name, "--password-stdin", "--db", str(db)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and why.split(" (")[0] in err, err


def test_cli_variants_are_one_user(tmp_path: Path) -> None:
    db = str(tmp_path / "t.db")
    added = run_cli("user", "add", "Alice", "--password-stdin", "--db", db, stdin="pw\n")
    assert added.returncode == 0 and "added user alice (normalized from 'Alice')" in added.stdout
    for variant in ("alice", "ALICE", "\uff41\uff4c\uff49\uff43\uff45"):
        again = run_cli("user", "add", variant, "--password-stdin", "--db", db, stdin="pw\n")
        assert again.returncode == 2 and "user 'alice' already exists" in again.stderr
    limits = run_cli("user", "limits", "ALICE", "--max-sessions", "3", "--db", db)
    assert limits.returncode == 0 and "max_sessions 3" in limits.stdout
    assert run_cli("user", "list", "--db", db).stdout == "alice\n"
    assert run_cli("user", "remove", "Alice", "--db", db).returncode == 0
    assert run_cli("user", "list", "--db", db).stdout == ""


async def test_api_refuses_and_normalizes(start_proxy: Callable[..., Any]) -> None:
    proxy = await start_proxy(admin=ADMIN, admin_token=TOKEN)
    async with httpx.AsyncClient(base_url=admin_url(proxy),
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        for name, _why in REFUSED:
            r = await api.post("/api/users", json={"user": name, "password": "pw"})
            assert r.status_code == 400, (name, r.text)
            assert r.headers["content-type"].startswith("application/json")
        created = await api.post("/api/users", json={"user": "Carol", "password": "pw"})
        assert created.status_code == 201 and created.json()["user"] == "carol"
        taken = await api.post("/api/users", json={"user": "\uff23AROL", "password": "pw"})
        assert taken.status_code == 409
    assert proxy.ctx.store.users() == ["alice", "carol"]


async def test_logins_compare_the_normalized_form(tmp_path: Path) -> None:
    store = Store(tmp_path / "t.db")
    store.add_user("alice", hash_password(b"pw"))
    store.add_user("Bob", hash_password(b"legacy"))  # as an older trisocks stored it
    auth = Authenticator(store)
    for sent, expected in [("alice", "alice"), ("Alice", "alice"), ("ALICE", "alice"),
                           ("\uff41lice", "alice"), ("Bob", "Bob"), ("bob", None),
                           ("al\u200bice", None), ("\u0430lice", None)]:
        password = b"legacy" if expected == "Bob" else b"pw"
        assert await auth.check(sent.encode(), password) == expected, sent
    store.close()


def _old_database(path: Path, names: list[str]) -> None:
    """A database as trisocks with schema version 2 left it."""
    db = sqlite3.connect(path, isolation_level=None)
    for number, script in enumerate(_MIGRATIONS[:2], start=1):
        assert isinstance(script, str)
        db.executescript(script)
        db.execute(f"PRAGMA user_version = {number}")
    for name in names:
        db.execute("INSERT INTO users VALUES (?, ?, 0, 0)", (name, f"hash-{name}"))
        db.execute("INSERT INTO usage (user, bytes_up) VALUES (?, 7)", (name,))
    db.close()
    path.chmod(0o600)


def test_migration_renames_old_names_and_keeps_collisions(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "old.db"
    _old_database(path, ["Alice", "Bob", "bob", "two words", "carol"])
    with caplog.at_level(logging.WARNING, "trisocks.store"):
        store = Store(path)
    assert store.users() == ["Bob", "alice", "bob", "carol", "two words"]
    assert store.password_hash("alice") == "hash-Alice"
    assert store.usage("alice")[0].bytes_up == 7  # accounting moved along
    assert "'Bob' kept as it is: its normalized name 'bob' is another user's" in caplog.text
    assert "'two words' kept as it is" in caplog.text
    assert "'Alice' renamed to 'alice'" in caplog.text
    store.close()
    caplog.clear()
    with caplog.at_level(logging.WARNING, "trisocks.store"):
        Store(path).close()  # once only: the migration is schema version 3
    assert not caplog.text


def test_postgres_migration_renames_too(pg_url: str) -> None:
    PostgresStore(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as pg:
        pg.execute("UPDATE schema_migrations SET version = 2 WHERE component = 'store'")
        pg.execute("INSERT INTO users VALUES ('Dave', 'h', 0, 0), ('erin', 'h', 0, 0), "
                   "('Erin', 'h2', 0, 0)")
    store = PostgresStore(pg_url)
    try:
        assert store.users() == ["Erin", "dave", "erin"]
    finally:
        store.close()


# --- (b) files -----------------------------------------------------------------------------


def test_files_are_private_whatever_the_umask(tmp_path: Path) -> None:
    """The default path, created by ``trisocks user add`` under umask 022."""
    data = tmp_path / "xdg"
    added = run_cli("user", "add", "alice", "--password-stdin", stdin="pw\n",
                    env={"XDG_DATA_HOME": str(data)}, umask=0o022)
    assert added.returncode == 0, added.stderr
    directory = data / "trisocks"
    assert mode(directory) == 0o700
    assert mode(directory / "trisocks.db") == 0o600
    old = os.umask(0o022)
    try:  # -wal and -shm exist while a connection is open
        store = Store(directory / "trisocks.db")
        store.add_usage([("alice", UsageDelta(1, 1, 1))])
        for suffix in ("-wal", "-shm"):
            assert mode(directory / f"trisocks.db{suffix}") == 0o600, suffix
        store.close()
        from trisocks.admin.tokens import _read_or_create

        _read_or_create(token_path(directory / "trisocks.db"))
    finally:
        os.umask(old)
    assert mode(directory / "admin-token") == 0o600


@pytest.mark.parametrize(("file_mode", "warned"), [
    (0o644, "readable by others"), (0o640, "readable by its group"), (0o600, None)])
def test_warns_about_a_readable_database(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, file_mode: int, warned: str | None
) -> None:
    path = tmp_path / "t.db"
    Store(path).close()
    path.chmod(file_mode)
    with caplog.at_level(logging.WARNING, "trisocks.store"):
        Store(path).close()
    if warned is None:
        assert not caplog.text
    else:
        assert f"{path} is {warned} (mode {file_mode:04o})" in caplog.text


# --- (c) the write lock held by another process --------------------------------------------

LOCK_HOLDER = textwrap.dedent("""
    import select, sqlite3, sys, time
    db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=30)
    db.execute("BEGIN EXCLUSIVE")
    db.execute("INSERT INTO usage (user) VALUES ('(lock holder)')")
    print("locked", flush=True)
    deadline = time.monotonic() + float(sys.argv[2])  # its own bounded lifetime
    while (left := deadline - time.monotonic()) > 0:
        if select.select([sys.stdin], [], [], left)[0]:
            line = sys.stdin.readline().strip()
            if line == "?":
                print("held" if db.in_transaction else "free", flush=True)
                continue
            break
    db.execute("ROLLBACK")
    print("released", flush=True)
""")


class LockHolder:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self._buffer = b""

    async def line(self) -> str:
        assert self.process.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await self.process.stdout.receive_some()
            assert chunk, "the lock holder ended"
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    async def ask(self, what: str) -> str:
        assert self.process.stdin is not None
        await self.process.stdin.send_all(what.encode() + b"\n")
        return await self.line()


async def test_connects_complete_while_another_process_holds_the_lock(
    tmp_path: Path, echo_server: tuple[str, int]
) -> None:
    path = tmp_path / "t.db"
    setup = Store(path)
    setup.add_user("alice", hash_password(b"pw"))
    setup.close()
    store = open_store(path, serving=True)  # as trisocks serve opens it
    assert isinstance(store, CachedStore)
    config = make_config(path, accounting_flush_interval=0.05)
    connects = 10
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            ctx = await nursery.start(serve_with_admin, config, store)
            proxy = ctx.listening[0][:2]
            process = await nursery.start(functools.partial(
                trio.run_process, [sys.executable, "-c", LOCK_HOLDER, str(path), "10"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, check=False))
            holder = LockHolder(process)
            assert await holder.line() == "locked"
            # Between two CONNECTs, two flushes with something to write: on the loop, each
            # would wait out busy_timeout (2 s), and the lock holder would be gone first.
            for i in range(connects):
                login = "Alice" if i % 2 else "alice"  # both name the same user
                async with await open_socks_stream(proxy, *echo_server,
                                                   auth=(login, "pw")) as stream:
                    await echo_round(stream, b"x" * 1000)
                target = ctx.accountant._flushes + 2
                for _ in range(1000):  # bounded wait for the flushes
                    if ctx.accountant._flushes >= target:
                        break
                    await trio.sleep(0.01)
            assert await holder.ask("?") == "held"  # all done while the lock was held
            for _ in range(1000):  # the sessions' ends are counted (bounded wait)
                if not len(ctx.registry):
                    break
                await trio.sleep(0.01)
            ctx.accountant.flush()
            assert await holder.ask("release") == "released"
            await store.sync()  # the writes queued while locked are sent now
            reader = Store(path)
            (usage,) = reader.usage("alice")
            reader.close()
            ctx.shutdown.set()
    store.close()
    assert (usage.sessions_total, usage.bytes_up, usage.bytes_down) == (
        connects, 1000 * connects, 1000 * connects)


# --- (d) schema versions -------------------------------------------------------------------


def _sqlite_with_version(path: Path, version: int) -> None:
    Store(path).close()
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {version}")
    db.close()


@pytest.mark.parametrize(("prepare", "message"), [
    (lambda p: _sqlite_with_version(p, 99),
     "has schema version 99, this trisocks knows up to {known}"),
    (lambda p: _sqlite_with_version(p, -1), "has schema version -1"),
    (lambda p: sqlite3.connect(p).execute("CREATE TABLE orders (x)").connection.close(),
     "has schema version 0 but tables (orders): not a trisocks database"),
    (lambda p: p.write_bytes(b"not sqlite at all" * 100), "file is not a database"),
])
@pytest.mark.parametrize("command", [["user", "list"], ["serve", "--no-admin"]])
def test_unknown_schema_is_one_line_and_status_2(
    tmp_path: Path, prepare: Callable[[Path], None], message: str, command: list[str]
) -> None:
    path = tmp_path / "t.db"
    prepare(path)
    path.chmod(0o600)  # no warning about a readable file in the way
    if command[0] == "serve":
        command = [*command, "--listen", "127.0.0.1:0"]
    done = run_cli(*command, "--db", str(path))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        f"trisocks: error: {done.stderr.split('error: ', 1)[1].strip()}"]
    assert message.format(known=KNOWN) in done.stderr
    with pytest.raises(StoreError, match="database"):
        open_store(path, read_only=True)


def test_postgres_newer_schema_is_one_line(pg_url: str) -> None:
    PostgresStore(pg_url).close()
    with psycopg.connect(pg_url, autocommit=True) as pg:
        pg.execute("UPDATE schema_migrations SET version = 42 WHERE component = 'store'")
    for read_only in (False, True):
        with pytest.raises(StoreError,
                           match=f"has (store )?schema version 42, this trisocks knows up to "
                                 f"{KNOWN}"):
            open_store(pg_url, read_only=read_only)
    done = run_cli("user", "list", "--db", pg_url)
    assert done.returncode == 2 and len(done.stderr.splitlines()) == 1, done.stderr
    assert "schema version 42" in done.stderr


def test_read_only_open_writes_nothing(tmp_path: Path, pg_url: str) -> None:
    path = tmp_path / "t.db"
    with pytest.raises(StoreError):
        open_store(path, read_only=True)
    assert not path.exists()
    store = Store(path)
    store.add_user("alice", "h")
    store.close()
    before = path.read_bytes()
    ro = open_store(path, read_only=True)
    assert ro.users() == ["alice"]
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        ro.add_user("bob", "h")
    ro.close()
    assert path.read_bytes() == before
    PostgresStore(pg_url).close()
    pg = open_store(pg_url, read_only=True)
    try:
        assert pg.users() == []
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            pg.add_user("bob", "h")
    finally:
        pg.close()
