"""A listener with ``proxy_protocol`` on: the header's client is the session's client, and a
connection without a valid header is refused before any SOCKS byte is answered."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio

from tests.conftest import Proxy, eventually, read_reply, receive_all, socks_handshake
from tests.test_udp import LOCALHOST4, ZEROS4, header, open_udp, start_udp_echo
from trisocks.policy import DEFAULT_RULES, parse_rules
from trisocks.protocol.proxy import encode_v1, encode_v2

pytestmark = pytest.mark.usefixtures("echo_server")


async def _connect_echo(stream: trio.SocketStream, echo: tuple[str, int]) -> None:
    host, port = echo
    await stream.send_all(b"\x05\x01\x00\x01" + trio.socket.inet_aton(host)
                          + port.to_bytes(2, "big"))
    rep, _, _ = await read_reply(stream)
    assert rep == 0


@pytest.mark.parametrize(
    ("header", "client"),
    [
        (encode_v2(("203.0.113.7", 40000), ("127.0.0.1", 1080)), "203.0.113.7:40000"),
        (encode_v1(("2001:db8::7", 40001), ("::1", 1080)), "[2001:db8::7]:40001"),
    ],
)
async def test_the_header_names_the_client(
    start_proxy: Callable[..., Any], echo_server: tuple[str, int], header: bytes, client: str
) -> None:
    with trio.fail_after(10):
        # The header's client is remote; the echo server is on this host, which the shipped
        # rules deny to remote clients (tests/test_this_host.py): leave that rule out here.
        rules = parse_rules([r for r in DEFAULT_RULES if r["id"] != "proxy-host"])
        proxy: Proxy = await start_proxy(proxy_protocol=True, rules=rules)
        stream = await proxy.open_raw()
        async with stream:
            # The greeting rides in the header's segment, as behind HAProxy.
            await stream.send_all(header + b"\x05\x01\x02")
            await stream.receive_some(2)
            await stream.send_all(b"\x01\x05alice\x0bs3cret-pass")
            assert await stream.receive_some(2) == b"\x01\x00"
            await _connect_echo(stream, echo_server)
            (session,) = proxy.ctx.registry
            assert str(session.client) == client and session.user == "alice"
            await stream.send_all(b"ping")
            assert await stream.receive_some(4) == b"ping"


async def test_local_header_keeps_the_socket_peer(
    start_proxy: Callable[..., Any], echo_server: tuple[str, int]
) -> None:
    with trio.fail_after(10):
        proxy: Proxy = await start_proxy(proxy_protocol=True)
        async with await proxy.open_raw() as stream:
            await stream.send_all(encode_v2(None))
            await socks_handshake(stream)
            await _connect_echo(stream, echo_server)
            (session,) = proxy.ctx.registry
            assert str(session.client).startswith("127.0.0.1:")


async def _refused(stream: trio.SocketStream) -> bool:
    """The server closed without answering (FIN, or RST when our bytes were unread)."""
    try:
        return await receive_all(stream) == b""
    except trio.BrokenResourceError:
        return True


@pytest.mark.parametrize(
    "first",
    [
        b"\x05\x01\x02",  # a SOCKS greeting straight away
        b"PROXY TCP9 nonsense\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF only: never complete, ends by timeout
    ],
)
async def test_no_valid_header_is_refused(start_proxy: Callable[..., Any], first: bytes) -> None:
    with trio.fail_after(10):
        proxy: Proxy = await start_proxy(proxy_protocol=True, handshake_timeout=0.5)
        async with await proxy.open_raw() as stream:
            await stream.send_all(first)
            assert await _refused(stream)
        await eventually(lambda: proxy.ctx.stats.handshake_failures["proxy_header"] == 1)
        assert proxy.ctx.registry.total == 0


async def test_silent_connection_times_out(
    start_proxy: Callable[..., Any], autojump_clock: trio.testing.MockClock
) -> None:
    with trio.fail_after(60):
        proxy: Proxy = await start_proxy(proxy_protocol=True, handshake_timeout=5)
        async with await proxy.open_raw() as stream:
            assert await _refused(stream)
        assert trio.current_time() == pytest.approx(5, abs=0.1)
        assert proxy.ctx.stats.handshake_failures["proxy_header"] == 1


async def test_udp_associate_admits_the_real_client_not_the_balancer(
    start_proxy: Callable[..., Any], nursery: trio.Nursery
) -> None:
    """Datagrams come straight from the client (a TCP balancer relays none): the association
    admits the address the header named, and drops the balancer's."""
    echo = await start_udp_echo(nursery, "127.0.0.1")
    with trio.fail_after(10):
        proxy: Proxy = await start_proxy(proxy_protocol=True)
        with await open_udp("127.0.0.2") as client, await open_udp() as balancer:
            async with await proxy.open_raw() as control:
                await control.send_all(encode_v2(client.getsockname(), proxy.address))
                await socks_handshake(control)
                await control.send_all(b"\x05\x03\x00" + ZEROS4 + b"\x00\x00")
                rep, _, relay_port = await read_reply(control)
                assert rep == 0
                ping = header(LOCALHOST4, echo[1]) + b"ping"
                await balancer.sendto(ping, ("127.0.0.1", relay_port))
                await client.sendto(ping, ("127.0.0.1", relay_port))
                assert (await client.recvfrom(65536))[0] == ping
                assert proxy.ctx.stats.udp_dropped["foreign_source"] == 1
