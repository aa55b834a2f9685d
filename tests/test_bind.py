"""BIND end to end over loopback: both replies byte for byte, relay, peer filtering, timeout."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import trio

from tests.conftest import Proxy, receive_all, receive_exactly, socks_handshake
from trisocks.protocol import Command

LOCALHOST4 = b"\x01\x7f\x00\x00\x01"  # ATYP=IPv4 127.0.0.1


def bind_request(dst: bytes, port: int = 0) -> bytes:
    """VER CMD=BIND RSV, then ATYP|DST.ADDR as given, DST.PORT."""
    return b"\x05\x02\x00" + dst + port.to_bytes(2, "big")


async def start_bind(proxy: Proxy, dst: bytes = LOCALHOST4) -> tuple[trio.SocketStream, int]:
    """Handshake and BIND; check the first reply byte for byte; return the listening port."""
    stream = await proxy.open_raw()
    await socks_handshake(stream)
    await stream.send_all(bind_request(dst))
    first = await receive_exactly(stream, 10)
    assert first[:8] == b"\x05\x00\x00" + LOCALHOST4  # VER REP=ok RSV ATYP 127.0.0.1
    port = int.from_bytes(first[8:], "big")
    assert port != 0
    return stream, port


async def connect_from(source: str, port: int) -> trio.SocketStream:
    """Connect to 127.0.0.1:*port* from the loopback address *source*."""
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        await sock.bind((source, 0))
        await sock.connect(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return trio.SocketStream(sock)


async def wait_sessions_ended(proxy: Proxy) -> None:
    """Return once the proxy has no live session (each session's end is notified)."""
    registry = proxy.ctx.registry
    ended = trio.Event()

    def on_event(_event: str, _session: object) -> None:
        if not len(registry):
            ended.set()

    registry.add_listener(on_event)
    try:
        if len(registry):
            await ended.wait()
    finally:
        registry.remove_listener(on_event)


def success_reply(stream: trio.SocketStream) -> bytes:
    """The second reply a peer connecting on *stream* should cause."""
    host, port = stream.socket.getsockname()[:2]
    return b"\x05\x00\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big")


async def test_bind_replies_and_relays_both_ways(proxy: Proxy) -> None:
    with trio.fail_after(10):
        control, port = await start_bind(proxy)
        [session] = proxy.ctx.registry.select()
        assert (session.command, session.state) == (Command.BIND, "connecting")
        async with control, await connect_from("127.0.0.1", port) as peer:
            assert await receive_exactly(control, 10) == success_reply(peer)
            assert str(session.resolved) == f"127.0.0.1:{peer.socket.getsockname()[1]}"
            await control.send_all(b"from client")
            assert await receive_exactly(peer, 11) == b"from client"
            assert session.state == "relaying"
            await peer.send_all(b"from peer")
            await peer.send_eof()
            assert await receive_all(control) == b"from peer"
            await control.send_all(b"after half-close")
            await control.send_eof()
            assert await receive_all(peer) == b"after half-close"


async def test_bind_accepts_any_peer_when_dst_addr_is_zeros(proxy: Proxy) -> None:
    with trio.fail_after(10):
        control, port = await start_bind(proxy, dst=b"\x01\x00\x00\x00\x00")
        async with control, await connect_from("127.0.0.3", port) as peer:
            assert await receive_exactly(control, 10) == success_reply(peer)


async def test_bind_refuses_peer_from_other_address_and_keeps_waiting(proxy: Proxy) -> None:
    with trio.fail_after(10):
        control, port = await start_bind(proxy, dst=b"\x01\x7f\x00\x00\x02")  # expect 127.0.0.2
        async with control:
            async with await connect_from("127.0.0.1", port) as stranger:
                assert await receive_all(stranger) == b""  # closed at once
            async with await connect_from("127.0.0.2", port) as peer:
                assert await receive_exactly(control, 10) == success_reply(peer)
                await peer.send_all(b"hi")
                assert await receive_exactly(control, 2) == b"hi"


async def test_bind_resolves_domain_dst_addr(proxy: Proxy) -> None:
    with trio.fail_after(10):
        control, port = await start_bind(proxy, dst=b"\x03\x09localhost")
        async with control, await connect_from("127.0.0.1", port) as peer:
            assert await receive_exactly(control, 10) == success_reply(peer)


async def test_bind_forwards_bytes_sent_before_the_peer_came(proxy: Proxy) -> None:
    with trio.fail_after(10):
        control, port = await start_bind(proxy)
        async with control:
            await control.send_all(b"early bytes")
            async with await connect_from("127.0.0.1", port) as peer:
                assert await receive_exactly(control, 10) == success_reply(peer)
                assert await receive_exactly(peer, 11) == b"early bytes"


async def test_bind_timeout_answers_ttl_expired(start_proxy: Callable[..., Any]) -> None:
    proxy = await start_proxy(bind_timeout=0.2)
    with trio.fail_after(10):
        control, _port = await start_bind(proxy)
        async with control:
            # VER REP=06 (TTL expired) RSV ATYP=IPv4 0.0.0.0:0, then the server closes.
            assert await receive_all(control) == b"\x05\x06\x00\x01\x00\x00\x00\x00\x00\x00"


async def test_bind_ends_when_the_client_leaves(proxy: Proxy) -> None:
    with trio.fail_after(10):
        control, port = await start_bind(proxy)
        await control.aclose()
        await wait_sessions_ended(proxy)
        sock = trio.socket.socket()
        with sock:
            try:
                await sock.connect(("127.0.0.1", port))
            except ConnectionRefusedError:
                pass
            else:
                raise AssertionError("the listening socket outlived its session")


async def test_bind_announces_external_address(start_proxy: Callable[..., Any]) -> None:
    proxy = await start_proxy(external_address="192.0.2.7")
    with trio.fail_after(10):
        async with await proxy.open_raw() as control:
            await socks_handshake(control)
            await control.send_all(bind_request(LOCALHOST4))
            first = await receive_exactly(control, 10)
            assert first[:8] == b"\x05\x00\x00\x01" + socket.inet_aton("192.0.2.7")
