"""The trio client library against trisocks and against third-party SOCKS5 servers
(microsocks for CONNECT with RFC 1929 auth, Dante for CONNECT, BIND and UDP), which the
fixtures here start on free loopback ports and stop afterwards."""

from __future__ import annotations

import functools
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import PASSWORD, USER, Proxy, receive_all, receive_exactly
from tests.test_udp import start_udp_echo
from trisocks.client import (
    SocksAuthError,
    SocksProtocolError,
    SocksReplyError,
    open_socks_bind,
    open_socks_stream,
    open_socks_udp,
)
from trisocks.protocol import Reply

AUTH = (USER, PASSWORD)


# --- helpers and third-party servers ------------------------------------------------------


def free_port() -> int:
    """A loopback TCP port that was free a moment ago (for programs that need a number)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port() -> int:
    """A loopback port with nothing listening: connecting to it is refused."""
    return free_port()


def program(name: str) -> str:
    """The path of a program the interop tests need; fail (never skip) when it is missing."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if path is None:
        pytest.fail(f"{name} is not installed; scripts/test installs it (apt-get install)")
    return path


async def wait_listening(port: int, process: trio.Process) -> None:
    """Return once something accepts on 127.0.0.1:*port*; fail if *process* died first."""
    while True:
        if process.returncode is not None:
            pytest.fail(f"{process.args!r} exited with {process.returncode}")
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            await trio.sleep(0.05)
            continue
        await stream.aclose()
        return


async def run_server(args: list[str], port: int, log: Path) -> AsyncIterator[tuple[str, int]]:
    """Run a SOCKS server program until the test ends; yield its address."""
    with log.open("wb") as out:
        process = await trio.lowlevel.open_process(args, stdout=out, stderr=subprocess.STDOUT)
        try:
            with trio.fail_after(10):
                await wait_listening(port, process)
            yield "127.0.0.1", port
        finally:
            process.terminate()
            with trio.move_on_after(5) as waiting:
                await process.wait()
            if waiting.cancelled_caught:
                process.kill()
                await process.wait()


@pytest.fixture
async def microsocks(tmp_path: Path) -> AsyncIterator[tuple[str, int]]:
    """microsocks with RFC 1929 auth (CONNECT only: it implements nothing else)."""
    port = free_port()
    args = [program("microsocks"), "-i", "127.0.0.1", "-p", str(port), "-u", USER, "-P", PASSWORD]
    async for address in run_server(args, port, tmp_path / "microsocks.log"):
        yield address


DANTE_CONFIG = """\
logoutput: stderr
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
socksmethod: none
clientmethod: none
{users}
client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}
socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 command: bind connect udpassociate bindreply udpreply }}
"""


@pytest.fixture
async def dante(tmp_path: Path) -> AsyncIterator[tuple[str, int]]:
    """Dante's danted, which implements CONNECT, BIND and UDP ASSOCIATE."""
    port = free_port()
    users = "user.privileged: root\nuser.unprivileged: nobody" if os.geteuid() == 0 else ""
    config = tmp_path / "danted.conf"
    config.write_text(DANTE_CONFIG.format(port=port, users=users))
    args = [program("danted"), "-f", str(config), "-p", str(tmp_path / "danted.pid")]
    async for address in run_server(args, port, tmp_path / "danted.log"):
        yield address


async def one_shot_proxy(nursery: trio.Nursery, script: bytes) -> tuple[str, int]:
    """A fake proxy that reads the greeting and request, sends *script* in one write, closes."""

    async def handler(stream: trio.SocketStream) -> None:
        async with stream:
            assert await receive_exactly(stream, 3) == b"\x05\x01\x00"  # no auth offered
            await stream.send_all(b"\x05\x00")
            await receive_exactly(stream, 10)  # CONNECT to an IPv4 address
            await stream.send_all(script)

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[:2]


# --- common scenarios, run against each server --------------------------------------------


async def check_connect(
    proxy: Any, echo: tuple[str, int], auth: Any = None, *, half_close: bool = True
) -> None:
    """A round trip through *proxy*; with *half_close*, the client's EOF must travel too
    while the echo comes back."""
    async with await open_socks_stream(proxy, *echo, auth=auth) as stream:
        assert stream.bound_address[0] == "127.0.0.1"
        await stream.send_all(b"round trip")
        if half_close:
            await stream.send_eof()
            assert await receive_all(stream) == b"round trip"
        else:
            assert await receive_exactly(stream, 10) == b"round trip"


async def check_bind(proxy: Any) -> None:
    async with open_socks_bind(proxy, "127.0.0.1", 0) as binding:
        host, port = binding.address
        async with await trio.open_tcp_stream(host, port) as peer:
            stream, peer_address = await binding.accept()
            assert peer_address == peer.socket.getsockname()[:2]
            await peer.send_all(b"from peer")
            assert await receive_exactly(stream, 9) == b"from peer"
            await stream.send_all(b"from client")
            assert await receive_exactly(peer, 11) == b"from client"


async def check_udp(proxy: Any, echo: Any, fragment_size: int | None = None) -> None:
    async with open_socks_udp(proxy, fragment_size=fragment_size, auth=AUTH) as udp:
        await udp.send_to(b"datagram payload", echo[:2])
        assert await udp.receive_from() == (b"datagram payload", echo[:2])


# --- against trisocks ---------------------------------------------------------------------


async def test_connect_through_trisocks(proxy: Proxy, echo_server: tuple[str, int]) -> None:
    with trio.fail_after(10):
        await check_connect(proxy.address, echo_server, AUTH)
        await check_connect(f"127.0.0.1:{proxy.port}", ("localhost", echo_server[1]), AUTH)


async def test_bind_through_trisocks(proxy: Proxy) -> None:
    with trio.fail_after(10):
        # trisocks wants credentials; the other servers here do not.
        async with open_socks_bind(proxy.address, "0.0.0.0", 0, auth=AUTH) as binding:
            async with await trio.open_tcp_stream(*binding.address) as peer:
                stream, _peer = await binding.accept()
                await stream.send_all(b"ok")
                assert await receive_exactly(peer, 2) == b"ok"


async def test_udp_through_trisocks(proxy: Proxy, nursery: trio.Nursery) -> None:
    echo = await start_udp_echo(nursery, "127.0.0.1")
    with trio.fail_after(10):
        await check_udp(proxy.address, echo)


async def test_udp_fragments_through_trisocks(proxy: Proxy, nursery: trio.Nursery) -> None:
    echo = await start_udp_echo(nursery, "127.0.0.1")
    with trio.fail_after(10):
        await check_udp(proxy.address, echo, fragment_size=5)
    assert proxy.ctx.stats.reassembled == 1


async def test_reply_codes_surface_as_typed_errors(proxy: Proxy) -> None:
    with trio.fail_after(10):
        with pytest.raises(SocksReplyError) as refused:
            await open_socks_stream(proxy.address, "127.0.0.1", closed_port(), auth=AUTH)
        assert refused.value.reply == Reply.CONNECTION_REFUSED


async def test_bind_timeout_surfaces_as_ttl_expired(start_proxy: Callable[..., Any]) -> None:
    proxy = await start_proxy(bind_timeout=0.2)
    with trio.fail_after(10):
        async with open_socks_bind(proxy.address, "127.0.0.1", 0, auth=AUTH) as binding:
            with pytest.raises(SocksReplyError) as expired:
                await binding.accept()
            assert expired.value.reply == Reply.TTL_EXPIRED


async def test_auth_errors(proxy: Proxy) -> None:
    with trio.fail_after(10):
        with pytest.raises(SocksAuthError, match="rejected"):
            await open_socks_stream(proxy.address, "127.0.0.1", 9, auth=(USER, "wrong"))
        with pytest.raises(SocksAuthError, match="none of the offered"):
            await open_socks_stream(proxy.address, "127.0.0.1", 9)


async def test_bytes_glued_to_the_reply_are_not_lost(nursery: trio.Nursery) -> None:
    reply = b"\x05\x00\x00\x01\x7f\x00\x00\x01\x04\xd2"  # ok, BND 127.0.0.1:1234
    fake = await one_shot_proxy(nursery, reply + b"early data")
    with trio.fail_after(10):
        async with await open_socks_stream(fake, "127.0.0.1", 9) as stream:
            assert stream.bound_address == ("127.0.0.1", 1234)
            assert await receive_all(stream) == b"early data"


async def test_protocol_errors(nursery: trio.Nursery) -> None:
    fake = await one_shot_proxy(nursery, b"\x05\x00\x00\x09")  # ATYP 9 does not exist
    with trio.fail_after(10), pytest.raises(SocksProtocolError):
        await open_socks_stream(fake, "127.0.0.1", 9)


# --- against third-party servers ------------------------------------------------------------


@pytest.mark.interop
async def test_connect_through_microsocks(
    microsocks: tuple[str, int], echo_server: tuple[str, int]
) -> None:
    with trio.fail_after(10):
        # microsocks closes both sides at the first EOF (no half-close), so if the client's EOF
        # overtakes the echo, the echo is lost: the round trip is checked without EOF.
        await check_connect(microsocks, echo_server, AUTH, half_close=False)
        with pytest.raises(SocksAuthError):
            await open_socks_stream(microsocks, *echo_server, auth=(USER, "wrong"))


@pytest.mark.interop
async def test_connect_through_dante(
    dante: tuple[str, int], echo_server: tuple[str, int]
) -> None:
    with trio.fail_after(10):
        await check_connect(dante, echo_server)


@pytest.mark.interop
async def test_bind_through_dante(dante: tuple[str, int]) -> None:
    with trio.fail_after(10):
        await check_bind(dante)


@pytest.mark.interop
async def test_udp_through_dante(dante: tuple[str, int], nursery: trio.Nursery) -> None:
    echo = await start_udp_echo(nursery, "127.0.0.1")
    with trio.fail_after(10):
        await check_udp(dante, echo)
