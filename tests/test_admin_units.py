"""Pieces of the admin API on their own: filters, tokens, tables, static files, and the
credential watcher against changes made through another db connection."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.admin_support import TOKEN, echo_round
from tests.conftest import USER, Proxy, open_connect, wait_closed
from tests.session_support import session_from_text
from trisocks.admin.app import create_app
from trisocks.admin.events import EventHub
from trisocks.admin.filters import FilterError, SessionFilter
from trisocks.admin.tokens import check_bearer, resolve_token
from trisocks.cli.admin_client import format_table
from trisocks.config import Config
from trisocks.passwords import hash_password
from trisocks.sessions import Session
from trisocks.store.sqlite import Store


def session(**fields: Any) -> Session:
    return session_from_text("abcd0123", fields.pop("client", "10.1.2.3:4000"), **fields)


@pytest.mark.parametrize(("args", "matches"), [
    ({}, True),
    ({"user": USER}, True),
    ({"user": "bob"}, False),
    ({"command": "connect"}, True),
    ({"command": "UDP"}, False),
    ({"client": "10.0.0.0/8"}, True),
    ({"client": "10.1.2.3"}, True),
    ({"client": "192.168.0.0/16"}, False),
    ({"client": "::/0"}, False),
    ({"target_host": "Example.COM"}, True),
    ({"target_host": "example.org"}, False),
    ({"target_port": "443"}, True),
    ({"target_host": "example.com", "target_port": "80"}, False),
])
def test_filter_matches(args: dict[str, str], matches: bool) -> None:
    s = session(user=USER, command="CONNECT", target="example.com:443")
    assert SessionFilter.from_args(args)(s) is matches


def test_filter_on_ipv6_and_unrequested_sessions() -> None:
    v6 = session(client="[::1]:5000", target="[2001:db8::1]:53", command="UDP")
    assert SessionFilter.from_args({"client": "::1/128", "target_host": "2001:db8::1"})(v6)
    assert not SessionFilter(target_port=53)(session())  # no target yet: not selected
    assert SessionFilter.from_args({"client": "10.0.0.0/8"}).client == ipaddress.ip_network(
        "10.0.0.0/8")


@pytest.mark.parametrize("args", [
    {"command": "PING"}, {"client": "10.0.0.0/33"}, {"client": "host"}, {"target_port": "0"},
    {"target_port": "-1"}, {"target_port": "70000"}, {"target_port": "8o"}, {"users": "a"},
])
def test_filter_rejects_bad_input(args: dict[str, str]) -> None:
    with pytest.raises(FilterError):
        SessionFilter.from_args(args)


def test_token_order_and_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = Config(db=tmp_path / "db.sqlite", admin_token=None)
    monkeypatch.setenv("TRISOCKS_ADMIN_TOKEN", "from-env")
    assert resolve_token(Config(db=config.db, admin_token="from-config")) == "from-config"
    assert resolve_token(config) == "from-env"
    monkeypatch.delenv("TRISOCKS_ADMIN_TOKEN")
    generated = resolve_token(config)
    path = tmp_path / "admin-token"
    assert len(generated) >= 32 and path.read_text() == generated + "\n"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert resolve_token(config) == generated
    path.write_text("")
    with pytest.raises(OSError, match="is empty"):
        resolve_token(config)


@pytest.mark.parametrize(("header", "ok"), [
    (f"Bearer {TOKEN}", True), (f"bearer {TOKEN}", True), (f"Bearer  {TOKEN} ", True),
    (None, False), ("", False), (TOKEN, False), (f"Basic {TOKEN}", False),
    (f"Bearer {TOKEN}x", False), ("Bearer t\u00f6ken", False),
])
def test_check_bearer(header: str | None, ok: bool) -> None:
    assert check_bearer(header, TOKEN) is ok


def test_format_table() -> None:
    table = format_table(("NAME", "BYTES", "SEEN"), [("alice", 12345, None), ("bo", 7, "now")])
    assert table.splitlines() == [
        "NAME   BYTES  SEEN",
        "alice  12345  -",
        "bo         7  now",
    ]


async def test_static_files(proxy: Proxy, tmp_path: Path) -> None:
    (tmp_path / "vendor").mkdir()
    (tmp_path / "index.html").write_text("<!doctype html>")
    (tmp_path / "app.js").write_text("export {}")
    (tmp_path / "vendor" / "lib.css").write_text("body {}")
    (tmp_path / "__init__.py").write_text("SECRET = 1")
    (tmp_path / ".hidden.js").write_text("x")
    app = create_app(proxy.ctx, TOKEN, EventHub(proxy.ctx.registry), static_dir=tmp_path)
    client = app.test_client()
    for path, content_type in [("/", "text/html"), ("/app.js", "text/javascript"),
                               ("/vendor/lib.css", "text/css")]:
        response = await client.get(path)
        assert response.status_code == 200
        assert response.content_type.startswith(content_type)
        assert response.headers["X-Content-Type-Options"] == "nosniff"
    for path in ["/__init__.py", "/.hidden.js", "/missing.js", "/vendor", "/../conftest.py",
                 "/vendor/../../x.js", "/%2e%2e/x.js"]:
        response = await client.get(path)
        assert response.status_code == 404, path
        assert "error" in await response.get_json()


async def test_watcher_revokes_changes_made_by_another_process(
    proxy: Proxy, echo_server: tuple[str, int], db_path: Path
) -> None:
    """Another Store connection stands for ``trisocks user passwd/remove`` in a shell."""
    other = Store(db_path)
    other.add_user("eve", hash_password(b"eve-pass"))
    try:
        with trio.fail_after(10):
            alice = await open_connect(proxy, echo_server)
            eve = await open_connect(proxy, echo_server, "eve", "eve-pass")
            async with alice, eve:
                await echo_round(alice, b"before")
                other.set_password(USER, hash_password(b"changed"))
                with trio.fail_after(2.5):  # the watcher looks every second
                    await wait_closed(alice)
                await echo_round(eve, b"unaffected")
                other.remove_user("eve")
                with trio.fail_after(2.5):
                    await wait_closed(eve)
    finally:
        other.close()
