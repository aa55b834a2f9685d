"""UDP ASSOCIATE over loopback: echo through the relay for each ATYP, source filtering,
fragment reassembly (in order, reset by a lower position, expiry on a fake clock) and the
association's end with its control connection."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import Proxy, have_ipv6, read_reply, receive_all, socks_handshake
from tests.test_bind import wait_sessions_ended
from trisocks.protocol import Address, Command, Reassembler, parse_udp_header
from trisocks.server.context import Stats
from trisocks.server.udp import FragmentQueue

LOCALHOST4 = b"\x01\x7f\x00\x00\x01"  # ATYP=IPv4 127.0.0.1
ZEROS4 = b"\x01\x00\x00\x00\x00"  # ATYP=IPv4 0.0.0.0


async def _echo_datagrams(sock: trio.socket.SocketType) -> None:
    with sock:
        while True:
            data, source = await sock.recvfrom(65536)
            await sock.sendto(data, source)


async def start_udp_echo(nursery: trio.Nursery, host: str) -> Any:
    """A UDP echo server on *host* (port 0) in *nursery*; returns its socket address."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    await sock.bind((host, 0))
    nursery.start_soon(_echo_datagrams, sock)
    return sock.getsockname()


@pytest.fixture
async def udp_echo(nursery: trio.Nursery) -> Any:
    return await start_udp_echo(nursery, "127.0.0.1")


async def open_udp(host: str = "127.0.0.1") -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await sock.bind((host, 0))
    return sock


async def associate(proxy: Proxy, dst: bytes = ZEROS4, port: int = 0) -> tuple[Any, Any]:
    """Handshake and UDP ASSOCIATE; return the control stream and the relay's address."""
    control = await proxy.open_raw()
    await socks_handshake(control)
    await control.send_all(b"\x05\x03\x00" + dst + port.to_bytes(2, "big"))
    rep, addr, relay_port = await read_reply(control)
    assert (rep, addr) == (0, LOCALHOST4)
    return control, ("127.0.0.1", relay_port)


def header(atyp_addr: bytes, port: int, frag: int = 0) -> bytes:
    """RSV=0000 FRAG ATYP DST.ADDR DST.PORT."""
    return b"\x00\x00" + bytes([frag]) + atyp_addr + port.to_bytes(2, "big")


def atyp_addr(sockaddr: Any) -> bytes:
    host = sockaddr[0]
    if ":" in host:
        return b"\x04" + socket.inet_pton(socket.AF_INET6, host)
    return b"\x01" + socket.inet_aton(host)


async def test_udp_echo_ipv4(proxy: Proxy, udp_echo: Any) -> None:
    with trio.fail_after(10):
        control, relay = await associate(proxy)
        with await open_udp() as client:
            async with control:
                await client.sendto(header(LOCALHOST4, udp_echo[1]) + b"ping", relay)
                data, source = await client.recvfrom(65536)
                assert source == relay
                assert data == header(LOCALHOST4, udp_echo[1]) + b"ping"
                [session] = proxy.ctx.registry.select()
                assert (session.command, session.state) == (Command.UDP_ASSOCIATE, "relaying")
            await wait_sessions_ended(proxy)  # the counters are final now
            counters = session.counters
            assert (counters.bytes_up, counters.bytes_down) == (4, 4)
            assert (counters.datagrams_up, counters.datagrams_down) == (1, 1)


async def test_udp_echo_ipv6_target(proxy: Proxy, nursery: trio.Nursery) -> None:
    if not have_ipv6():
        pytest.fail("this machine has no IPv6 loopback; the IPv6 tests need ::1")
    echo = await start_udp_echo(nursery, "::1")
    expected = header(b"\x04" + socket.inet_pton(socket.AF_INET6, "::1"), echo[1]) + b"six"
    with trio.fail_after(10):
        control, relay = await associate(proxy)
        with await open_udp() as client:
            async with control:
                await client.sendto(expected, relay)
                assert (await client.recvfrom(65536))[0] == expected


async def test_udp_echo_domain_target(proxy: Proxy, nursery: trio.Nursery) -> None:
    # Serve on the address "localhost" resolves to first, as the relay will pick that one.
    infos = await trio.socket.getaddrinfo("localhost", 0, type=socket.SOCK_DGRAM)
    echo = await start_udp_echo(nursery, infos[0][4][0])
    with trio.fail_after(10):
        control, relay = await associate(proxy)
        with await open_udp() as client:
            async with control:
                await client.sendto(header(b"\x03\x09localhost", echo[1]) + b"named", relay)
                data, _ = await client.recvfrom(65536)
                # The answer's header names the source by IP, not by the name asked for.
                assert data == header(atyp_addr(echo), echo[1]) + b"named"


async def test_udp_drops_foreign_and_malformed_datagrams(proxy: Proxy, udp_echo: Any) -> None:
    with trio.fail_after(10):
        control, relay = await associate(proxy)
        with await open_udp() as client, await open_udp() as stranger, await open_udp(
            "127.0.0.2"
        ) as far_away:
            async with control:
                ping = header(LOCALHOST4, udp_echo[1]) + b"ping"
                await client.sendto(ping, relay)  # fixes the client's port
                assert (await client.recvfrom(65536))[0] == ping
                await stranger.sendto(ping, relay)  # right IP, wrong port
                await far_away.sendto(ping, relay)  # wrong IP
                await client.sendto(b"\x00\x00\x00\x09", relay)  # ATYP 9: malformed
                # Datagrams are handled in arrival order: once this echo is back, the three
                # above have been dropped.
                await client.sendto(ping, relay)
                assert (await client.recvfrom(65536))[0] == ping
                dropped = proxy.ctx.stats.udp_dropped
                assert (dropped["foreign_source"], dropped["malformed"]) == (2, 1)
                [session] = proxy.ctx.registry.select()
                assert session.counters.datagrams_up == 2  # only the client's pings went out


async def test_udp_port_named_in_request_is_the_only_one_admitted(
    proxy: Proxy, udp_echo: Any
) -> None:
    with trio.fail_after(10):
        with await open_udp() as client, await open_udp() as other:
            control, relay = await associate(proxy, LOCALHOST4, client.getsockname()[1])
            async with control:
                ping = header(LOCALHOST4, udp_echo[1]) + b"ping"
                await other.sendto(ping, relay)  # first, but not from DST.PORT
                await client.sendto(ping, relay)
                assert (await client.recvfrom(65536))[0] == ping
                assert proxy.ctx.stats.udp_dropped["foreign_source"] == 1


async def test_udp_fragments_are_reassembled(proxy: Proxy, udp_echo: Any) -> None:
    with trio.fail_after(10):
        control, relay = await associate(proxy)
        with await open_udp() as client:
            async with control:
                for frag, part in ((1, b"frag"), (2, b"men"), (0x83, b"ted")):
                    await client.sendto(header(LOCALHOST4, udp_echo[1], frag) + part, relay)
                data, _ = await client.recvfrom(65536)
                assert data == header(LOCALHOST4, udp_echo[1]) + b"fragmented"
                assert proxy.ctx.stats.reassembled == 1


async def test_udp_lower_position_resets_the_queue(proxy: Proxy, udp_echo: Any) -> None:
    with trio.fail_after(10):
        control, relay = await associate(proxy)
        with await open_udp() as client:
            async with control:
                # 1, 2, then 1 again: the first sequence is abandoned, the second completes.
                for frag, part in ((1, b"old-1"), (2, b"old-2"), (1, b"new-1"), (0x82, b"new-2")):
                    await client.sendto(header(LOCALHOST4, udp_echo[1], frag) + part, relay)
                data, _ = await client.recvfrom(65536)
                assert data == header(LOCALHOST4, udp_echo[1]) + b"new-1new-2"
                assert proxy.ctx.stats.udp_dropped["fragment"] == 2
                assert proxy.ctx.stats.reassembled == 1


async def test_fragment_queue_expires_without_traffic(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The timer path of the relay's receive loop, on virtual time: the queue goes at its
    deadline although no datagram arrives to notice it."""
    with trio.fail_after(60):
        stats = Stats()
        queue = FragmentQueue(Reassembler(timeout=5.0), stats)
        first = parse_udp_header(b"\x00\x00\x01" + Address.of("127.0.0.1", 9).encode())
        assert queue.feed(first, b"part one") is None
        received: list[bytes] = []
        send, receive = trio.open_memory_channel[bytes](1)
        async with send, receive, trio.open_nursery() as nursery:

            async def receive_one() -> None:
                received.append(await queue.wait(receive.receive))

            nursery.start_soon(receive_one)
            await trio.sleep(4.999)
            assert queue.reassembler.pending == 1
            await trio.sleep(0.002)
            assert queue.reassembler.pending == 0
            assert stats.udp_dropped["fragment"] == 1
            await send.send(b"next datagram")
        assert received == [b"next datagram"]


async def test_association_ends_with_its_control_connection(
    proxy: Proxy, udp_echo: Any
) -> None:
    with trio.fail_after(10):
        control, relay = await associate(proxy)
        with await open_udp() as client:
            await client.connect(relay)  # so that the ICMP "port unreachable" is reported
            ping = header(LOCALHOST4, udp_echo[1]) + b"ping"
            await client.send(ping)
            assert await client.recv(65536) == ping
            await control.aclose()
            await wait_sessions_ended(proxy)
            await client.send(ping)
            with pytest.raises(ConnectionRefusedError):
                await client.recv(65536)


async def test_idle_association_times_out(start_proxy: Callable[..., Any]) -> None:
    proxy = await start_proxy(udp_idle_timeout=0.2)
    with trio.fail_after(10):
        control, _relay = await associate(proxy)
        async with control:
            assert await receive_all(control) == b""  # the server closed the association
        await wait_sessions_ended(proxy)


async def test_killing_the_session_ends_the_association(proxy: Proxy) -> None:
    with trio.fail_after(10):
        control, _relay = await associate(proxy)
        async with control:
            [session] = proxy.ctx.registry.select()
            assert proxy.ctx.registry.kill(session.id, "admin kill")
            assert await receive_all(control) == b""
        await wait_sessions_ended(proxy)
        assert session.close_reason == "admin kill"


async def test_udp_names_the_idna_codec_refuses_are_dropped(proxy: Proxy, udp_echo: Any) -> None:
    """A datagram to a 255-byte (one label) domain is dropped as unreachable; it used to raise
    UnicodeError in getaddrinfo and end the association and the server with it."""
    with trio.fail_after(10):
        control, relay = await associate(proxy)
        with await open_udp() as client:
            async with control:
                name = b"\x03\xff" + b"a" * 255
                await client.sendto(header(name, udp_echo[1]) + b"lost", relay)
                await client.sendto(header(LOCALHOST4, udp_echo[1]) + b"ping", relay)
                data, _ = await client.recvfrom(65536)
                assert data == header(LOCALHOST4, udp_echo[1]) + b"ping"
                assert proxy.ctx.stats.udp_dropped["unreachable"] == 1
