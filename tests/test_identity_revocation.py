"""Revocation that follows the identity's source (:mod:`trisocks.server.revocation`), through a
real proxy with the store and a local HTTP auth hook (:mod:`tests.hook_support`) as backends:
a reload ends a removed store user's session but never an external identity's; a hook that
cannot answer keeps sessions (one warning per burst) and a refusal after it recovers ends them;
an account without live sessions is forgotten; the admin API and the CLI set limits of any
identity, and the store refuses names that would stand for one."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests.admin_support import ADMIN, TOKEN, admin_url, auth_status, echo_round
from tests.conftest import (
    PASSWORD,
    USER,
    Proxy,
    connect_request,
    eventually,
    open_connect,
    read_reply,
    socks_handshake,
)
from tests.hook_support import Hook, start_hook
from trisocks.identity.model import EXTERNAL_SOURCES
from trisocks.server.reload import reload_config
from trisocks.store.records import EXTERNAL_PREFIXES, StoreError, validate_username
from trisocks.store.sqlite import Store

StartProxy = Callable[..., Any]
Echo = tuple[str, int]

LOGIN, SECRET = "Carol", "hook-pass-1"
ACCOUNT = "http:carol"


@pytest.fixture
async def hook(nursery: trio.Nursery) -> Hook:
    hook = await start_hook(nursery)
    hook.users[LOGIN] = (SECRET, "carol", ["staff"])
    return hook


async def both_proxy(start_proxy: StartProxy, hook: Hook, **overrides: Any) -> Proxy:
    """A proxy checking the store first, then the hook; reloads re-read the running config."""
    values: dict[str, Any] = {"password_backends": ("store", "http"), "auth_hook_url": hook.url,
                              "auth_hook_timeout": 2.0, "admin": ADMIN, "admin_token": TOKEN}
    values.update(overrides)
    proxy: Proxy = await start_proxy(**values)
    proxy.ctx.load_config = lambda: proxy.ctx.config
    return proxy


def refuse_everyone(_payload: Any) -> tuple[int, bytes]:
    return 200, b'{"allow": false}'


def fail(_payload: Any) -> tuple[int, bytes]:
    return 500, b"down"


async def test_reload_ends_a_removed_store_user_but_keeps_external_identities(
    start_proxy: StartProxy, hook: Hook, echo_server: Echo, store: Store
) -> None:
    proxy = await both_proxy(start_proxy, hook)
    with trio.fail_after(20):
        ours = await open_connect(proxy, echo_server, USER, PASSWORD)
        theirs = await open_connect(proxy, echo_server, LOGIN, SECRET)
        async with ours, theirs:
            await echo_round(ours, b"store")
            await echo_round(theirs, b"hook")
            by_user = {s.user: s for s in proxy.ctx.registry}
            assert (by_user[USER].source, by_user[ACCOUNT].source) == ("store", "http")
            store.remove_user(USER)
            assert reload_config(proxy.ctx)["ended"] == 1
            assert await ours.receive_some(10) == b""  # ended: the user is gone
            await echo_round(theirs, b"still here")
    assert by_user[USER].close_reason in ("reload: user removed", "credentials revoked")
    assert not str(by_user[ACCOUNT].close_reason).startswith("reload")


async def test_a_down_backend_keeps_sessions_and_a_refusal_after_recovery_ends_them(
    start_proxy: StartProxy, hook: Hook, echo_server: Echo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    proxy = await both_proxy(start_proxy, hook, auth_revalidate_interval=0.1)
    with trio.fail_after(20):
        stream = await open_connect(proxy, echo_server, LOGIN, SECRET)
        async with stream:
            await echo_round(stream, b"up")
            hook.answer = fail
            asked = len(hook.seen)
            await eventually(lambda: len(hook.seen) >= asked + 5, 10)  # five rounds or more
            await echo_round(stream, b"kept while the hook is down")
            warnings = [r.getMessage() for r in caplog.records
                        if "revalidation" in r.getMessage() and r.levelno == logging.WARNING]
            assert len(warnings) == 1 and "HTTP 500" in warnings[0]  # once per burst
            hook.answer = refuse_everyone
            assert await stream.receive_some(10) == b""
        await eventually(lambda: not len(proxy.ctx.registry), 5)
    ended = [r.getMessage() for r in caplog.records if r.name == "trisocks.access"]
    assert len(ended) == 1 and ACCOUNT in ended[0] and "revoked by http" in ended[0]
    assert ACCOUNT not in proxy.ctx.logins.remembered()


async def test_an_account_without_live_sessions_is_forgotten(
    start_proxy: StartProxy, hook: Hook, echo_server: Echo
) -> None:
    proxy = await both_proxy(start_proxy, hook, auth_revalidate_interval=0.1)
    with trio.fail_after(20):
        stream = await open_connect(proxy, echo_server, LOGIN, SECRET)
        async with stream:
            await echo_round(stream, b"x")
            assert ACCOUNT in proxy.ctx.logins.remembered()
        await eventually(lambda: not len(proxy.ctx.registry), 5)
        await eventually(lambda: ACCOUNT not in proxy.ctx.logins.remembered(), 5)
        asked = len(hook.seen)
        await trio.sleep(0.5)  # several rounds: nothing left to ask the hook about
    assert len(hook.seen) == asked


async def test_limits_and_kills_for_an_external_identity_through_the_api(
    start_proxy: StartProxy, hook: Hook, echo_server: Echo
) -> None:
    proxy = await both_proxy(start_proxy, hook)
    async with httpx.AsyncClient(base_url=admin_url(proxy),
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        with trio.fail_after(20):
            assert (await api.get(f"/api/users/{ACCOUNT}")).status_code == 404  # no usage yet
            put = await api.put("/api/users/http%3Acarol/limits", json={"max_sessions": 1})
            assert put.status_code == 200 and put.json()["limits"]["max_sessions"] == 1
            assert (await api.put("/api/users/nobody/limits", json={})).status_code == 404
            stream = await open_connect(proxy, echo_server, LOGIN, SECRET)
            async with stream:
                await echo_round(stream, b"one")
                async with await trio.open_tcp_stream(*proxy.address) as second:
                    await socks_handshake(second, LOGIN, SECRET)
                    await second.send_all(connect_request(*echo_server))
                    rep, _, _ = await read_reply(second)
                assert rep != 0  # refused: the account's own limit is one session
                assert proxy.ctx.stats.limited["user_sessions"] == 1
                row = (await api.get(f"/api/users/{ACCOUNT}")).json()
                assert (row["source"], row["active_sessions"]) == ("http", 1)
                assert row["limits"]["max_sessions"] == 1
                killed = (await api.delete(f"/api/users/{ACCOUNT}/sessions")).json()
                assert killed == {"killed": 1}
                assert await stream.receive_some(10) == b""
            assert (await api.delete("/api/users/http:nobody/sessions")).json() == {"killed": 0}
            assert (await api.delete("/api/users/nobody/sessions")).status_code == 404
            users = (await api.get("/api/users")).json()["users"]
    sources = {u["user"]: u["source"] for u in users}
    assert sources[ACCOUNT] == "http" and sources[USER] == "store"


async def test_metrics_count_logins_per_backend_and_result(
    start_proxy: StartProxy, hook: Hook
) -> None:
    proxy = await both_proxy(start_proxy, hook, auth_failure_limit=100)
    with trio.fail_after(20):
        assert await auth_status(proxy, USER, PASSWORD) == 0  # store: accepted
        assert await auth_status(proxy, LOGIN, SECRET) == 0  # store: refused; http: accepted
        assert await auth_status(proxy, LOGIN, "wrong") != 0  # store, http: refused
        hook.answer = fail
        assert await auth_status(proxy, "erin", "pw") != 0  # store: refused; http: error
        async with httpx.AsyncClient(base_url=admin_url(proxy),
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as api:
            text = (await api.get("/metrics")).text
    samples = {tuple(sorted(s.labels.items())): s.value
               for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == "trisocks_logins_total"}
    assert samples == {
        (("backend", "store"), ("result", "accepted")): 1,
        (("backend", "store"), ("result", "refused")): 3,
        (("backend", "store"), ("result", "error")): 0,
        (("backend", "http"), ("result", "accepted")): 1,
        (("backend", "http"), ("result", "refused")): 1,
        (("backend", "http"), ("result", "error")): 1,
    }


def test_store_names_cannot_stand_for_external_identities(tmp_path: Path) -> None:
    assert EXTERNAL_PREFIXES == tuple(f"{s}:" for s in EXTERNAL_SOURCES)
    for prefix in EXTERNAL_PREFIXES:
        with pytest.raises(StoreError, match=f"reserved for identities from {prefix[:-1]}"):
            validate_username(prefix + "alice")
    assert validate_username("alice:ldap") == "alice:ldap"  # only a source prefix is taken
    store = Store(tmp_path / "u.db")
    try:
        with pytest.raises(StoreError, match="reserved"):
            store.add_user("ldap:alice", "hash")
        assert not store.has_user("ldap:alice")
    finally:
        store.close()


def test_cli_sets_limits_of_external_identities_only(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    Store(db).close()
    run = [sys.executable, "-m", "trisocks", "user"]
    out = subprocess.run([*run, "limits", "gssapi:dave", "--quota-day", "1G", "--db", str(db)],
                         text=True, capture_output=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert f"quota_day {1 << 30}" in out.stdout
    store = Store(db)
    try:
        assert store.user_limits("gssapi:dave").quota_day == 1 << 30
    finally:
        store.close()
    bad = subprocess.run([*run, "limits", "dave", "--db", str(db)], text=True,
                         capture_output=True, timeout=60)
    assert bad.returncode == 2 and "no user 'dave'" in bad.stderr
    added = subprocess.run([*run, "add", "pam:dave", "--password-stdin", "--db", str(db)],
                           input="pw\n", text=True, capture_output=True, timeout=60)
    assert added.returncode == 2 and "reserved for identities from pam" in added.stderr
