"""``trisocks sessions list|kill`` and ``trisocks usage`` in a subprocess against a live server,
and ``trisocks user remove`` from another process ending a live session."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio

from tests.admin_support import ADMIN, TOKEN, admin_proxy, admin_url, echo_round
from tests.conftest import USER, Proxy, open_connect, wait_closed

__all__ = ["admin_proxy"]  # fixtures used by name

Echo = tuple[str, int]


async def trisocks(
    *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    """Run the CLI; *env* entries are added to a copy of ours without the admin variables."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("TRISOCKS_ADMIN")}
    with trio.fail_after(30):
        return await trio.run_process(
            [sys.executable, "-m", "trisocks", *args], env={**base, **(env or {})},
            capture_stdout=True, capture_stderr=True, check=False,
        )


def connection(proxy: Proxy) -> dict[str, str]:
    return {"TRISOCKS_ADMIN_URL": admin_url(proxy), "TRISOCKS_ADMIN_TOKEN": TOKEN}


async def test_sessions_list_and_kill(admin_proxy: Proxy, echo_server: Echo) -> None:
    env = connection(admin_proxy)
    async with await open_connect(admin_proxy, echo_server) as stream:
        await echo_round(stream, b"c" * 321)
        listed = await trisocks("sessions", "list", env=env)
        assert listed.returncode == 0, listed.stderr
        header, row = listed.stdout.decode().splitlines()
        assert header.split() == ["ID", "USER", "CLIENT", "COMMAND", "TARGET", "STATE", "AGE",
                                  "UP", "DOWN"]
        session_id, user, _client, command, target, state, _age, up, down = row.split()
        host, port = echo_server
        assert (user, command, target, state) == (USER, "CONNECT", f"{host}:{port}", "relaying")
        assert (up, down) == ("321", "321")
        other_user = await trisocks("sessions", "list", "--user", "bob", env=env)
        assert len(other_user.stdout.decode().splitlines()) == 1  # the header only
        killed = await trisocks("sessions", "kill", session_id, env=env)
        assert (killed.returncode, killed.stdout.decode()) == (0, f"killed session {session_id}\n")
        with trio.fail_after(1):
            await wait_closed(stream)
    again = await trisocks("sessions", "kill", session_id, env=env)
    assert again.returncode == 2
    assert f"no live session '{session_id}'" in again.stderr.decode()


async def test_usage(admin_proxy: Proxy, echo_server: Echo) -> None:
    env = connection(admin_proxy)
    async with await open_connect(admin_proxy, echo_server) as stream:
        await echo_round(stream, b"u" * 99)
    everyone = await trisocks("usage", env=env)
    assert everyone.returncode == 0, everyone.stderr
    lines = everyone.stdout.decode().splitlines()
    assert lines[0].split() == ["USER", "ACTIVE", "SESSIONS", "UP", "DOWN", "DGRAMS_UP",
                                "DGRAMS_DOWN", "LAST_SEEN"]
    (row,) = [line.split() for line in lines[1:] if line.startswith(USER)]
    assert row[3:5] == ["99", "99"]
    one = await trisocks("usage", USER, env=env)
    assert one.stdout.decode().splitlines()[1].split()[:5] == row[:5]
    unknown = await trisocks("usage", "nobody", env=env)
    assert unknown.returncode == 2 and "no user 'nobody'" in unknown.stderr.decode()


async def test_errors_exit_2_with_a_message(admin_proxy: Proxy) -> None:
    wrong = await trisocks("usage", "--url", admin_url(admin_proxy), "--token", "nope")
    assert wrong.returncode == 2
    assert wrong.stderr.decode() == (
        "trisocks: error: missing or wrong bearer token (HTTP 401)\n"
    )
    down = await trisocks("sessions", "list", "--url", "http://127.0.0.1:1", "--token", "x")
    assert down.returncode == 2
    assert "cannot reach the admin API at http://127.0.0.1:1" in down.stderr.decode()


async def test_no_token_with_a_postgresql_db_says_where_to_give_one() -> None:
    result = await trisocks("usage", "--db", "postgresql://proxy@db.example/trisocks")
    assert result.returncode == 2
    assert result.stderr.decode() == (
        "trisocks: error: no admin token: pass --token or set TRISOCKS_ADMIN_TOKEN (servers on "
        "PostgreSQL keep no token file)\n")


async def test_malformed_url_is_one_line_and_status_2() -> None:
    bad = await trisocks("usage", "--url", "http://[::1", "--token", "x")
    assert bad.returncode == 2
    assert bad.stderr.decode().startswith("trisocks: error: bad admin API URL 'http://[::1': ")
    assert bad.stderr.decode().count("\n") == 1


async def test_token_from_the_servers_file(
    start_proxy: Callable[..., Any], db_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.delenv("TRISOCKS_ADMIN_TOKEN", raising=False)
    proxy = await start_proxy(admin=ADMIN)
    result = await trisocks("sessions", "list", "--db", str(db_path),
                            env={"TRISOCKS_ADMIN_URL": admin_url(proxy)})
    assert result.returncode == 0, result.stderr
    missing = await trisocks("usage", "--db", str(db_path.parent / "elsewhere" / "x.db"),
                             env={"TRISOCKS_ADMIN_URL": admin_url(proxy)})
    assert missing.returncode == 2 and "no admin token" in missing.stderr.decode()


async def test_user_removed_by_another_process_loses_its_session(
    admin_proxy: Proxy, echo_server: Echo, db_path: Path
) -> None:
    async with await open_connect(admin_proxy, echo_server) as stream:
        await echo_round(stream, b"r")
        removed = await trisocks("user", "remove", USER, "--db", str(db_path))
        assert removed.returncode == 0, removed.stderr
        with trio.fail_after(2.5):  # the credential watcher looks every second
            await wait_closed(stream)
