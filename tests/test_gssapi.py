"""GSSAPI (RFC 1961) end to end through a real MIT Kerberos KDC (tests/krb.py).

The realm is built once per test session (KDC child process killed at the end); every
session test runs trisocks with ``auth = gssapi`` and a keytab for ``socks/localhost``.
Clients are either the trio client library or, to misbehave on purpose, raw frames.

Outside CI these tests skip when ``gssapi`` or the MIT KDC programs are missing, with the
reason in the summary (``-ra``); with ``CI`` set they fail instead.
"""

from __future__ import annotations

import functools
import hashlib
import os
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from tests import krb
from tests.admin_support import ADMIN, TOKEN, admin_url
from tests.conftest import (
    Proxy,
    connect_request,
    eventually,
    read_reply,
    receive_all,
    receive_exactly,
)
from tests.test_udp import start_udp_echo
from trisocks.client import (
    GSSAPI,
    SocksAuthError,
    open_socks_bind,
    open_socks_stream,
    open_socks_udp,
)
from trisocks.config import ConfigError, build_config
from trisocks.gss.stream import GssStream
from trisocks.protocol import Address, encode_udp_header, parse_udp_header
from trisocks.protocol.gssapi import MessageType, parse_datagram, parse_frame
from trisocks.server.gssapi import user_of
from trisocks.server.reload import reload_config

# --- the realm --------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def realm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[krb.Realm]:
    reason = krb.missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"GSSAPI tests must run in CI: {reason}")
        pytest.skip(reason)
    realm = krb.start_realm(tmp_path_factory.mktemp("krb5"))
    saved = {key: os.environ.get(key) for key in realm.environ()}
    os.environ.update(realm.environ())
    try:
        realm.kinit()
        print(f"\nKerberos realm up in {realm.setup_seconds * 1000:.0f} ms", file=sys.stderr)
        yield realm
    finally:
        realm.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def gss_proxy(realm: krb.Realm, start_proxy: Callable[..., Any]) -> Callable[..., Any]:
    """``await gss_proxy(**overrides)``: a proxy offering GSSAPI with the realm's keytab."""
    return functools.partial(start_proxy, auth=("gssapi",), gss_keytab=realm.keytab)


def test_realm_kdc_alive(realm: krb.Realm) -> None:
    assert realm.kdc.poll() is None  # how fast it came up: benchmarks/service_levels.py


# --- helpers ----------------------------------------------------------------------------------

LOCALHOST = "localhost"  # the host in socks/localhost@TRISOCKS.TEST, whatever address is used


async def open_gss(
    proxy: Proxy | tuple[str, int], level: int = 2, service: str = "socks"
) -> GssStream:
    """Greeting offering only GSSAPI, then the client library's RFC 1961 exchange."""
    address = proxy.address if isinstance(proxy, Proxy) else proxy
    stream = await trio.open_tcp_stream(*address)
    await stream.send_all(b"\x05\x01\x01")  # ver nmethods [gssapi]
    assert await receive_exactly(stream, 2) == b"\x05\x01"
    gss = GSSAPI(service=service, level=level, host=LOCALHOST)
    try:
        return await gss.establish(stream, bytearray(), LOCALHOST)
    except BaseException:
        await stream.aclose()
        raise


async def expect_abort(stream: trio.SocketStream) -> None:
    """RFC 1961 §3.8: ``01 FF``, then the server closes."""
    assert await receive_all(stream) == b"\x01\xff"


@attrs.define
class Tap:
    """A TCP forwarder in front of the proxy that records both directions."""

    address: tuple[str, int]
    up: bytearray = attrs.Factory(bytearray)
    down: bytearray = attrs.Factory(bytearray)


async def start_tap(nursery: trio.Nursery, target: tuple[str, int]) -> Tap:
    tap = Tap(("", 0))

    async def pump(src: trio.SocketStream, dst: trio.SocketStream, log: bytearray) -> None:
        try:
            async for chunk in src:
                log += chunk
                await dst.send_all(chunk)
            await dst.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def forward(client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream(*target) as server:
            async with trio.open_nursery() as inner:
                inner.start_soon(pump, client, server, tap.up)
                inner.start_soon(pump, server, client, tap.down)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, forward, 0,
                                                      host="127.0.0.1"))
    tap.address = listeners[0].socket.getsockname()[:2]
    return tap


def frames(wire: bytes | bytearray) -> list[tuple[int, int]]:
    """(MTYP, token length) of every frame in *wire*, which starts with a frame."""
    found, buf = [], bytearray(wire)
    while buf:
        parsed = parse_frame(buf, MessageType(buf[1]))
        assert parsed is not None, "the recording ends inside a frame"
        frame, used = parsed
        found.append((int(frame.mtyp), len(frame.token)))
        del buf[:used]
    return found


async def exchange(stream: trio.abc.HalfCloseableStream, payload: bytes) -> bytes:
    """Send *payload* and half-close while reading what comes back until EOF."""
    async with trio.open_nursery() as nursery:

        async def send() -> None:
            await stream.send_all(payload)
            await stream.send_eof()

        nursery.start_soon(send)
        return await receive_all(stream)


# --- CONNECT ----------------------------------------------------------------------------------

PAYLOAD = os.urandom(300_000)  # > 4 maximal frames each way


@pytest.mark.parametrize("level", [1, 2])
async def test_connect_moves_data_both_ways_in_wrapped_frames(
    gss_proxy: Callable[..., Any], echo_server: tuple[str, int], nursery: trio.Nursery,
    level: int,
) -> None:
    with trio.fail_after(20):
        proxy = await gss_proxy()
        tap = await start_tap(nursery, proxy.address)
        stream = await open_gss(tap.address, level)
        async with stream:
            await stream.send_all(connect_request(*echo_server))
            rep, _addr, _port = await read_reply(stream)
            assert rep == 0
            [session] = proxy.ctx.registry.select()
            echoed = await exchange(stream, PAYLOAD)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(PAYLOAD).digest()
        await eventually(lambda: not len(proxy.ctx.registry), limit=10)
    assert session.user == f"gssapi:{krb.USER}"  # the account of a Kerberos identity
    # Exact payload accounting: the wrapping is not counted.
    assert (session.counters.bytes_up, session.counters.bytes_down) == (len(PAYLOAD),) * 2
    up, down = frames(tap.up[3:]), frames(tap.down[2:])  # past greeting / method selection
    assert [m for m, _ in up[:2]] == [1, 2] and [m for m, _ in down[:2]] == [1, 2]
    for direction in (up, down):
        data = [size for mtyp, size in direction[2:] if mtyp == 3]
        assert len(data) >= 5 and max(data) > 60_000  # several frames, each nearly full
    # Level 1 protects integrity only, so the payload is visible on the wire; level 2 hides it.
    assert (PAYLOAD[100_000:100_032] in tap.up) is (level == 1)


async def test_selective_level_is_answered_with_the_closest_accepted(
    gss_proxy: Callable[..., Any], echo_server: tuple[str, int]
) -> None:
    with trio.fail_after(10):
        proxy = await gss_proxy(gss_level=(1,))
        async with await open_gss(proxy, level=3) as stream:
            # Level 1 (integrity only): the plaintext shows in the wrapped token.
            assert b"visible" in stream.wrap_frames(b"visible")
            await stream.send_all(connect_request(*echo_server))
            assert (await read_reply(stream))[0] == 0
            assert await exchange(stream, b"selective") == b"selective"


async def test_request_pipelined_with_the_last_frames_is_kept(
    gss_proxy: Callable[..., Any], echo_server: tuple[str, int]
) -> None:
    """The request and early payload in the same write as nothing else: split-proof reads."""
    with trio.fail_after(10):
        proxy = await gss_proxy()
        async with await open_gss(proxy) as stream:
            await stream.transport.send_all(
                stream.wrap_frames(connect_request(*echo_server) + b"early bytes")
            )
            assert (await read_reply(stream))[0] == 0
            assert await receive_exactly(stream, 11) == b"early bytes"


# --- failures ---------------------------------------------------------------------------------


async def test_bad_ticket_is_answered_with_abort(gss_proxy: Callable[..., Any]) -> None:
    with trio.fail_after(10):
        proxy = await gss_proxy()
        stream = await proxy.open_raw()
        async with stream:
            # Greeting and a context frame with a forged token, in one write.
            await stream.send_all(b"\x05\x01\x01" + b"\x01\x01\x00\x05forge")
            assert await receive_exactly(stream, 2) == b"\x05\x01"
            await expect_abort(stream)
        await eventually(lambda: not len(proxy.ctx.registry), limit=10)
        assert proxy.ctx.stats.handshake_failures["auth_failed"] == 1


async def test_ticket_for_a_service_without_key_is_answered_with_abort(
    gss_proxy: Callable[..., Any],
) -> None:
    """A valid ticket, but for other/localhost: the keytab holds no key to read it."""
    with trio.fail_after(10):
        proxy = await gss_proxy()
        with pytest.raises(SocksAuthError, match="aborted"):
            await open_gss(proxy, service="other")


async def test_unknown_service_principal_fails_at_the_client(
    gss_proxy: Callable[..., Any],
) -> None:
    with trio.fail_after(10):
        proxy = await gss_proxy()
        with pytest.raises(SocksAuthError, match="not found"):
            await open_gss(proxy, service="nosuch")


async def test_client_without_ticket_gets_a_clear_error(
    gss_proxy: Callable[..., Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("KRB5CCNAME", f"FILE:{tmp_path / 'empty-ccache'}")
    with trio.fail_after(10):
        proxy = await gss_proxy()
        with pytest.raises(SocksAuthError, match="GSSAPI"):
            await open_socks_stream(proxy.address, "127.0.0.1", 9, auth=GSSAPI(host=LOCALHOST))


@pytest.mark.parametrize("when", ["request", "relay", "replay"])
async def test_tampered_frame_aborts_and_closes(
    gss_proxy: Callable[..., Any], echo_server: tuple[str, int], when: str
) -> None:
    with trio.fail_after(10):
        proxy = await gss_proxy()
        stream = await open_gss(proxy)
        async with stream:
            if when != "request":
                await stream.send_all(connect_request(*echo_server))
                assert (await read_reply(stream))[0] == 0
            [session] = proxy.ctx.registry.select()
            if when == "replay":  # a frame the server has already accepted, sent again
                frame = stream.wrap_frames(b"once")
                await stream.transport.send_all(frame)
                assert await receive_exactly(stream, 4) == b"once"
                await stream.transport.send_all(frame)
            else:
                message = connect_request(*echo_server) if when == "request" else b"tampered"
                wire = bytearray(stream.wrap_frames(message))
                wire[-1] ^= 0x01  # one bit of the token's checksum
                await stream.transport.send_all(wire)
            await expect_abort(stream.transport)
        await eventually(lambda: not len(proxy.ctx.registry), limit=10)
    assert "GSS-API" in (session.close_reason or "")


async def test_server_downgrade_is_refused_by_the_client(
    gss_proxy: Callable[..., Any],
) -> None:
    with trio.fail_after(10):
        proxy = await gss_proxy(gss_level=(1,))
        stream = await proxy.open_raw()
        await stream.send_all(b"\x05\x01\x01")
        [session] = proxy.ctx.registry.select()
        await receive_exactly(stream, 2)
        with pytest.raises(SocksAuthError, match="below"):
            await GSSAPI(level=2, host=LOCALHOST).establish(stream, bytearray(), LOCALHOST)
        await stream.aclose()
        await eventually(lambda: not len(proxy.ctx.registry), limit=10)
    assert "aborted" in (session.close_reason or "")  # the server got our 01 FF


# --- UDP ---------------------------------------------------------------------------------------


async def test_udp_datagrams_are_encapsulated(
    gss_proxy: Callable[..., Any], nursery: trio.Nursery
) -> None:
    with trio.fail_after(10):
        proxy = await gss_proxy()
        echo = await start_udp_echo(nursery, "127.0.0.1")
        target = Address.of(*echo)
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            await udp.bind(("127.0.0.1", 0))
            async with await open_gss(proxy) as control:
                await control.send_all(connect_request(*udp.getsockname(), cmd=3))
                rep, _addr, relay_port = await read_reply(control)
                assert rep == 0
                await udp.connect(("127.0.0.1", relay_port))
                # A plain SOCKS datagram is not accepted once GSSAPI is in force ...
                await udp.send(encode_udp_header(target) + b"plain")
                # ... a wrapped one is, and the answer comes back wrapped.
                await udp.send(control.wrap_datagram(encode_udp_header(target) + b"wrapped"))
                answer = await udp.recv(65536)
                datagram = control.protection.unwrap(parse_datagram(answer))
                header = parse_udp_header(datagram)
                assert (header.address, datagram[header.offset :]) == (target, b"wrapped")
                [session] = proxy.ctx.registry.select()
                assert session.counters.datagrams_up == 1
                assert session.counters.bytes_up == len(b"wrapped")
                assert proxy.ctx.stats.udp_dropped["malformed"] == 1


# --- the session's user -------------------------------------------------------------------------


def test_principal_to_user() -> None:
    assert user_of("alice@TRISOCKS.TEST", "TRISOCKS.TEST") == "alice"
    assert user_of("alice@OTHER.TEST", "TRISOCKS.TEST") == "alice@OTHER.TEST"
    assert user_of("host/web@TRISOCKS.TEST", "TRISOCKS.TEST") == "host/web"


async def test_admin_api_shows_the_principal_as_user(
    gss_proxy: Callable[..., Any], echo_server: tuple[str, int]
) -> None:
    with trio.fail_after(10):
        proxy = await gss_proxy(admin=ADMIN, admin_token=TOKEN)
        async with await open_gss(proxy) as stream, httpx.AsyncClient(
            base_url=admin_url(proxy), headers={"Authorization": f"Bearer {TOKEN}"}
        ) as api:
            await stream.send_all(connect_request(*echo_server))
            assert (await read_reply(stream))[0] == 0
            sessions = (await api.get("/api/sessions")).json()["sessions"]
            assert [s["user"] for s in sessions] == [f"gssapi:{krb.USER}"]


async def test_a_live_session_survives_a_reload(
    gss_proxy: Callable[..., Any], echo_server: tuple[str, int]
) -> None:
    """Regression (issue 14): a reload (what SIGHUP runs) ended every Kerberos session with
    "reload: user removed", the principal being no row of the store."""
    with trio.fail_after(20):
        proxy = await gss_proxy()
        proxy.ctx.load_config = lambda: proxy.ctx.config
        async with await open_gss(proxy) as stream:
            await stream.send_all(connect_request(*echo_server))
            assert (await read_reply(stream))[0] == 0
            await stream.send_all(b"before")
            assert await receive_exactly(stream, 6) == b"before"
            assert reload_config(proxy.ctx)["ended"] == 0
            await trio.sleep(1.5)  # the credential watcher (every second) leaves it alone too
            [session] = proxy.ctx.registry.select()
            assert (session.user, session.close_reason) == (f"gssapi:{krb.USER}", None)
            assert await exchange(stream, b"after the reload") == b"after the reload"
    assert not str(session.close_reason).startswith("reload")  # it ended as the client did


async def test_bytes_show_in_the_users_api_and_metrics(
    gss_proxy: Callable[..., Any], echo_server: tuple[str, int]
) -> None:
    """Regression (issue 14): a Kerberos identity's accounting was invisible in
    ``GET /api/users``; it is listed with source ``gssapi``, exact bytes, and can have limits."""
    account = f"gssapi:{krb.USER}"
    payload = os.urandom(70_000)
    with trio.fail_after(20):
        proxy = await gss_proxy(admin=ADMIN, admin_token=TOKEN)
        async with await open_gss(proxy) as stream:
            await stream.send_all(connect_request(*echo_server))
            assert (await read_reply(stream))[0] == 0
            assert await exchange(stream, payload) == payload
        await eventually(lambda: not len(proxy.ctx.registry), limit=10)
        async with httpx.AsyncClient(base_url=admin_url(proxy),
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as api:
            users = (await api.get("/api/users")).json()["users"]
            one = (await api.get(f"/api/users/gssapi%3A{krb.USER}")).json()
            limits = await api.put(f"/api/users/{account}/limits", json={"max_sessions": 3})
            metrics = (await api.get("/metrics")).text
    [row] = [u for u in users if u["user"] == account]
    assert (row["source"], row["bytes_up"], row["bytes_down"], row["sessions_total"]) == (
        "gssapi", len(payload), len(payload), 1)
    assert (one["user"], one["source"], one["bytes_down"]) == (account, "gssapi", len(payload))
    assert limits.status_code == 200 and limits.json()["limits"]["max_sessions"] == 3
    assert proxy.ctx.store.user_limits(account).max_sessions == 3
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(metrics) for s in family.samples}
    for way in ("up", "down"):
        key = ("trisocks_user_bytes_total", (("direction", way), ("user", account)))
        assert samples[key] == len(payload)


# --- the client library -------------------------------------------------------------------------


@pytest.mark.parametrize("level", [1, 2])
async def test_client_library_connect(
    gss_proxy: Callable[..., Any], echo_server: tuple[str, int], level: int
) -> None:
    with trio.fail_after(10):
        proxy = await gss_proxy(auth=("password", "gssapi"))
        auth = GSSAPI(level=level, host=LOCALHOST)
        async with await open_socks_stream(proxy.address, *echo_server, auth=auth) as stream:
            assert await exchange(stream, PAYLOAD[:100_000]) == PAYLOAD[:100_000]


async def test_client_library_bind(gss_proxy: Callable[..., Any]) -> None:
    with trio.fail_after(10):
        proxy = await gss_proxy()
        async with open_socks_bind(proxy.address, "127.0.0.1", 0,
                                   auth=GSSAPI(host=LOCALHOST)) as binding:
            async with await trio.open_tcp_stream(*binding.address) as peer:
                stream, _ = await binding.accept()
                await peer.send_all(b"from peer")
                assert await receive_exactly(stream, 9) == b"from peer"
                await stream.send_all(b"from client")
                assert await receive_exactly(peer, 11) == b"from client"


async def test_client_library_udp(gss_proxy: Callable[..., Any], nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        proxy = await gss_proxy()
        echo = await start_udp_echo(nursery, "127.0.0.1")
        async with open_socks_udp(proxy.address, auth=GSSAPI(host=LOCALHOST)) as udp:
            await udp.send_to(b"over kerberos", echo)
            assert await udp.receive_from() == (b"over kerberos", tuple(echo[:2]))


# --- configuration (no realm needed) -------------------------------------------------------------


def test_gssapi_without_the_extra_names_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib.util

    from trisocks.cli.main import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gssapi" else real(name, *a))
    with pytest.raises(SystemExit) as info:
        main(["serve", "--auth", "password,gssapi", "--db", str(tmp_path / "t.db"),
              "--no-admin"])
    assert info.value.code == 2
    assert "trisocks[gssapi]" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("value", "result"),
    [("1", (1,)), ("2", (2,)), ("1,2", (1, 2)), ("2, 1", (1, 2)), (2, (2,)), ([1, 2], (1, 2)),
     ("3", None), ("", None), ("1,x", None)],
)
def test_gss_level_values(value: Any, result: tuple[int, ...] | None) -> None:
    if result is None:
        with pytest.raises(ConfigError, match="gss_level"):
            build_config({"gss_level": value}, {})
    else:
        assert build_config({"gss_level": value}, {}).gss_level == result


def test_missing_keytab_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"gss_keytab: file .* does not exist"):
        build_config({"gss_keytab": str(tmp_path / "none.keytab")}, {})
