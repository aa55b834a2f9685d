"""The admin API against a live proxy: listing, killing, accounting, users, auth and errors."""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.admin_support import (
    ADMIN,
    TOKEN,
    admin_proxy,
    admin_url,
    api,
    auth_status,
    echo_round,
    fd_count,
    session_of,
    socket_count,
)
from tests.conftest import (
    PASSWORD,
    USER,
    Proxy,
    eventually,
    make_config,
    open_connect,
    read_reply,
    receive_exactly,
    socks_handshake,
    wait_closed,
)
from trisocks.admin.server import serve_with_admin
from trisocks.passwords import hash_password
from trisocks.store.sqlite import Store

__all__ = ["admin_proxy", "api"]  # fixtures used by name

Echo = tuple[str, int]


async def test_transfer_is_listed_with_user_target_and_growing_counts(
    admin_proxy: Proxy, api: httpx.AsyncClient, echo_server: Echo
) -> None:
    with trio.fail_after(10):
        stream = await open_connect(admin_proxy, echo_server)
        async with stream:
            await echo_round(stream, b"x" * 1000)
            first = await session_of(api, user=USER)
            assert first["user"] == USER
            assert first["command"] == "CONNECT"
            assert first["target"] == f"{echo_server[0]}:{echo_server[1]}"
            assert first["resolved"] == first["target"]
            assert first["client"] == f"127.0.0.1:{stream.socket.getsockname()[1]}"
            assert first["started_at"].endswith("Z")
            assert (first["bytes_up"], first["bytes_down"]) == (1000, 1000)
            await echo_round(stream, b"y" * 5000)
            again = (await api.get(f"/api/sessions/{first['id']}")).json()
            assert (again["bytes_up"], again["bytes_down"]) == (6000, 6000)


async def test_delete_ends_exactly_that_session(
    admin_proxy: Proxy, api: httpx.AsyncClient, echo_server: Echo
) -> None:
    with trio.fail_after(10):
        victim = await open_connect(admin_proxy, echo_server)
        survivor = await open_connect(admin_proxy, echo_server)
        async with victim, survivor:
            await echo_round(victim, b"v")
            await echo_round(survivor, b"s")
            port = victim.socket.getsockname()[1]
            listed = (await api.get("/api/sessions")).json()["sessions"]
            (target,) = [s for s in listed if s["client"] == f"127.0.0.1:{port}"]
            assert (await api.delete(f"/api/sessions/{target['id']}")).status_code == 204
            with trio.fail_after(1):
                await wait_closed(victim)
            await echo_round(survivor, b"still here" * 100)
            async def gone() -> bool:
                return (await api.get(f"/api/sessions/{target['id']}")).status_code == 404

            await eventually(gone, limit=10)
            assert (await api.delete(f"/api/sessions/{target['id']}")).status_code == 404
            assert len((await api.get("/api/sessions")).json()["sessions"]) == 1


async def test_kill_closes_every_socket(
    admin_proxy: Proxy, api: httpx.AsyncClient, echo_server: Echo
) -> None:
    with trio.fail_after(10):
        # Warm up what the server keeps between sessions (the relay engine's pipe pool, the
        # API client's pooled connection), so that the baseline holds only that.
        async with await open_connect(admin_proxy, echo_server) as stream:
            await echo_round(stream, b"warm-up")
        await eventually(lambda: not admin_proxy.ctx.registry.select(), limit=10)
        await api.get("/healthz")
        baseline, sockets = fd_count(), socket_count()
        stream = await open_connect(admin_proxy, echo_server)
        await echo_round(stream, b"ping")
        session = await session_of(api)
        # The client, the proxy's two sockets, the echo server's.
        assert socket_count() == sockets + 4
        await api.delete(f"/api/sessions/{session['id']}")
        # Only the test's own client socket may remain (how soon: benchmarks/service_levels.py).
        await eventually(lambda: socket_count() == sockets + 1, limit=10, interval=0.002)
        await wait_closed(stream)
        await stream.aclose()
        # A pooled pipe with unsent data is closed rather than reused: fewer fds, never more.
        assert fd_count() <= baseline


@pytest.mark.parametrize(("request_", "proxy_sockets"), [
    (b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x00", 2),  # BIND from 127.0.0.1: control, listener
    (b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00", 3),  # UDP: control, relay, outbound
], ids=["BIND", "UDP"])
async def test_kill_closes_bind_listener_and_udp_sockets(
    admin_proxy: Proxy, api: httpx.AsyncClient, request_: bytes, proxy_sockets: int
) -> None:
    with trio.fail_after(10), trio.socket.socket(type=socket.SOCK_DGRAM) as udp_client:
        await udp_client.bind(("127.0.0.1", 0))
        await api.get("/healthz")  # the client's pooled connection is part of the baseline
        sockets = socket_count()
        control = await admin_proxy.open_raw()
        async with control:
            await socks_handshake(control)
            await control.send_all(request_)
            rep, _, port = await read_reply(control)
            assert rep == 0
            if request_[1] == 3:  # a datagram to anywhere makes the outbound socket
                datagram = b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x09" + b"discard me"
                await udp_client.sendto(datagram, ("127.0.0.1", port))
            await eventually(lambda: socket_count() == sockets + 1 + proxy_sockets, limit=10)
            (session,) = (await api.get("/api/sessions")).json()["sessions"]
            await api.delete(f"/api/sessions/{session['id']}")
            await eventually(lambda: socket_count() == sockets + 1, limit=10, interval=0.002)
            await wait_closed(control)
        assert socket_count() == sockets


async def test_delete_selection_by_filters(
    admin_proxy: Proxy, api: httpx.AsyncClient, echo_server: Echo, store: Store
) -> None:
    store.add_user("bob", hash_password(b"bob-pass"))
    with trio.fail_after(10):
        alice = await open_connect(admin_proxy, echo_server)
        bob = await open_connect(admin_proxy, echo_server, "bob", "bob-pass")
        async with alice, bob:
            await echo_round(alice, b"a")
            await echo_round(bob, b"b")
            host, port = echo_server
            none = await api.delete("/api/sessions", params={"target_port": port + 1})
            assert none.json() == {"killed": 0}
            killed = await api.delete(
                "/api/sessions", params={"user": "bob", "client": "127.0.0.0/8",
                                         "target_host": host, "target_port": port},
            )
            assert killed.json() == {"killed": 1}
            with trio.fail_after(1):
                await wait_closed(bob)
            await echo_round(alice, b"alive")
            killed = await api.delete(f"/api/users/{USER}/sessions")
            assert killed.json() == {"killed": 1}
            with trio.fail_after(1):
                await wait_closed(alice)


async def _sink_then_send(reply_size: int, stream: trio.SocketStream) -> None:
    """A target that reads until EOF, then sends *reply_size* bytes and closes."""
    while await stream.receive_some(65536):
        pass
    await stream.send_all(b"d" * reply_size)


async def test_user_totals_equal_payload_and_survive_restart(
    nursery: trio.Nursery, store: Store, db_path: Path
) -> None:
    up, down = 300_000, 123_457
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, functools.partial(_sink_then_send, down), 0,
                          host="127.0.0.1")
    )
    target = listeners[0].socket.getsockname()[:2]
    config = make_config(db_path, admin=ADMIN, admin_token=TOKEN, accounting_flush_interval=60.0)
    headers = {"Authorization": f"Bearer {TOKEN}"}

    async def usage(proxy: Proxy) -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=admin_url(proxy), headers=headers) as client:
            return (await client.get(f"/api/users/{USER}")).json()  # type: ignore[no-any-return]

    with trio.fail_after(20):
        async with trio.open_nursery() as first_run:
            ctx = await first_run.start(serve_with_admin, config, store)
            proxy = Proxy(ctx, *ctx.listening[0])
            async with await open_connect(proxy, target) as stream:
                await stream.send_all(b"u" * up)
                await stream.send_eof()
                assert await receive_exactly(stream, down) == b"d" * down
                await wait_closed(stream)
            async def ended() -> dict[str, Any] | None:
                row = await usage(proxy)
                return None if row["active_sessions"] else row

            live = await eventually(ended, limit=20)
            assert (live["bytes_up"], live["bytes_down"], live["sessions_total"]) == (up, down, 1)
            ctx.shutdown.set()  # the flush interval is 60 s: only the shutdown flush persists
        restarted_store = Store(db_path)
        try:
            async with trio.open_nursery() as second_run:
                ctx = await second_run.start(serve_with_admin, config, restarted_store)
                after = await usage(Proxy(ctx, *ctx.listening[0]))
                ctx.shutdown.set()
        finally:
            restarted_store.close()
    assert (after["bytes_up"], after["bytes_down"], after["sessions_total"]) == (up, down, 1)
    assert after["last_seen"] is not None


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": f"Basic {TOKEN}"},
                                     {"Authorization": "Bearer t\u00f6ken".encode("latin-1")}])
@pytest.mark.parametrize("path", ["/api/sessions", "/api/users", "/api/stats", "/metrics",
                                  "/api/events", "/api/openapi.json", "/api/nothing-here"])
async def test_401_without_the_token(
    admin_proxy: Proxy, headers: dict[str, Any], path: str
) -> None:
    async with httpx.AsyncClient(base_url=admin_url(admin_proxy)) as client:
        response = await client.get(path, headers=headers)
    assert response.status_code == 401
    assert response.json() == {"error": "missing or wrong bearer token"}
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


async def test_public_routes(start_proxy: Callable[..., Any]) -> None:
    proxy = await start_proxy(admin=ADMIN, admin_token=TOKEN, metrics_public=True)
    async with httpx.AsyncClient(base_url=admin_url(proxy)) as client:
        health = await client.get("/healthz")
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        assert (await client.get("/metrics")).status_code == 200
        assert (await client.get("/api/stats")).status_code == 401


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("GET", "/api/sessions/deadbeef", None, 404),
    ("DELETE", "/api/sessions/deadbeef", None, 404),
    ("GET", "/api/users/nobody", None, 404),
    ("DELETE", "/api/users/nobody", None, 404),
    ("DELETE", "/api/users/nobody/sessions", None, 404),
    ("PUT", "/api/users/nobody/password", {"password": "x"}, 404),
    ("GET", "/api/sessions?command=GOPHER", None, 400),
    ("GET", "/api/sessions?client=not-a-network", None, 400),
    ("GET", "/api/sessions?target_port=65536", None, 400),
    ("GET", "/api/sessions?target_port=http", None, 400),
    ("GET", "/api/sessions?usr=alice", None, 400),
    ("DELETE", "/api/sessions", None, 400),
    ("POST", "/api/users", b"{not json", 400),
    ("POST", "/api/users", [1, 2], 400),
    ("POST", "/api/users", {"user": "carol"}, 400),
    ("POST", "/api/users", {"user": "carol", "password": ""}, 400),
    ("POST", "/api/users", {"user": "carol", "password": "p" * 256}, 400),
    ("POST", "/api/users", {"user": "ca\nrol", "password": "pw"}, 400),
    ("POST", "/api/users", {"user": "", "password": "pw"}, 400),
    ("POST", "/api/users", {"user": "(anonymous)", "password": "pw"}, 400),
    ("POST", "/api/users", {"user": 7, "password": "pw"}, 400),
    ("POST", "/api/users", {"user": USER, "password": "pw"}, 409),
    ("PUT", f"/api/users/{USER}/password", {"pass": "x"}, 400),
    ("PUT", "/api/sessions", None, 405),
])
async def test_error_answers(
    api: httpx.AsyncClient, method: str, path: str, body: Any, status: int
) -> None:
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = await api.request(method, path, **kwargs)
    assert response.status_code == status
    assert set(response.json()) == {"error"} and response.json()["error"]


async def test_user_added_through_the_api_can_use_the_proxy(
    admin_proxy: Proxy, api: httpx.AsyncClient, echo_server: Echo
) -> None:
    with trio.fail_after(10):
        created = await api.post("/api/users", json={"user": "carol", "password": "c-pass"})
        assert created.status_code == 201
        assert created.json()["user"] == "carol" and created.json()["sessions_total"] == 0
        async with await open_connect(admin_proxy, echo_server, "carol", "c-pass") as stream:
            await echo_round(stream, b"hello")
            assert (await session_of(api, user="carol"))["user"] == "carol"
        names = [u["user"] for u in (await api.get("/api/users")).json()["users"]]
        assert names == sorted([USER, "carol"])


async def test_password_change_and_removal_revoke(
    admin_proxy: Proxy, api: httpx.AsyncClient, echo_server: Echo
) -> None:
    with trio.fail_after(10):
        stream = await open_connect(admin_proxy, echo_server)
        async with stream:
            await echo_round(stream, b"before")
            changed = await api.put(f"/api/users/{USER}/password", json={"password": "new-pass"})
            assert changed.status_code == 204
            with trio.fail_after(1):
                await wait_closed(stream)
        assert await auth_status(admin_proxy, USER, PASSWORD) != 0  # no stale cache
        stream = await open_connect(admin_proxy, echo_server, USER, "new-pass")
        async with stream:
            await echo_round(stream, b"after")
            assert (await api.delete(f"/api/users/{USER}")).status_code == 204
            with trio.fail_after(1):
                await wait_closed(stream)
        assert (await api.get(f"/api/users/{USER}")).status_code == 404
        assert await auth_status(admin_proxy, USER, "new-pass") != 0


async def test_stats(admin_proxy: Proxy, api: httpx.AsyncClient, echo_server: Echo) -> None:
    with trio.fail_after(10):
        async with await open_connect(admin_proxy, echo_server) as stream:
            await echo_round(stream, b"z" * 10)
            await session_of(api)
            stats = (await api.get("/api/stats")).json()
    assert stats["sessions_active"] == 1 and stats["sessions_total"] == 1
    assert stats["sessions_by_state"]["relaying"] == 1
    assert stats["sessions_by_command"] == {"CONNECT": 1, "BIND": 0, "UDP": 0, "RESOLVE": 0,
                                            "RESOLVE_PTR": 0}
    assert (stats["bytes_up"], stats["bytes_down"]) == (10, 10)
    assert stats["uptime"] >= 0


async def test_generated_token_is_stored_0600_and_reused(
    start_proxy: Callable[..., Any], db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TRISOCKS_ADMIN_TOKEN", raising=False)
    proxy = await start_proxy(admin=ADMIN)
    token_file = db_path.parent / "admin-token"
    assert token_file.stat().st_mode & 0o777 == 0o600
    token = token_file.read_text().strip()
    again = await start_proxy(admin=ADMIN)
    for server in (proxy, again):
        async with httpx.AsyncClient(base_url=admin_url(server)) as client:
            ok = await client.get("/api/stats", headers={"Authorization": f"Bearer {token}"})
            assert ok.status_code == 200
