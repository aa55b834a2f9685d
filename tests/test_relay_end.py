"""How a relay ended, as its session's close reason (issue 12): a client that closes or resets
right after its last read, or a half-close its receiver can no longer take, is a normal end;
a reset from the target mid-transfer, or from the client while the target still sends, keeps
its cause and names its side. Real sockets on loopback, both relay engines."""

from __future__ import annotations

import errno
import functools
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from tests.conftest import (
    Proxy,
    echo_round_trip,
    eventually,
    open_connect,
    receive_all,
    receive_exactly,
    wait_closed,
)
from trisocks.server.engines import CopyEngine, Engine, SpliceEngine
from trisocks.sessions import Session

ENGINES = ["splice", "copy"]
PAYLOAD = bytes(range(256)) * 1200  # 300 KiB: past the splice engine's probe, under 1 MiB


def reset(sock: Any) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.fixture(params=ENGINES)
async def engine_proxy(request: pytest.FixtureRequest, start_proxy: Any) -> Proxy:
    proxy: Proxy = await start_proxy(relay_engine=request.param)
    assert proxy.ctx.engine.name == request.param
    return proxy


def record_ends(proxy: Proxy) -> list[Session]:
    """Sessions as they end (their close reason is final by then)."""
    ended: list[Session] = []
    proxy.ctx.registry.add_listener(
        lambda event, session: ended.append(session) if event == "end" else None)
    return ended


async def start_target(
    nursery: trio.Nursery, handler: Callable[[trio.SocketStream], Awaitable[None]]
) -> tuple[str, int]:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[:2]


# --- normal ends ----------------------------------------------------------------------------


@pytest.mark.parametrize("read", ["to-eof", "exact-length"])
async def test_client_reset_right_after_its_last_read_is_a_normal_end(
    engine_proxy: Proxy, nursery: trio.Nursery, read: str
) -> None:
    """The target sends a response and closes; the client reads it (to EOF, or just the
    length it expected) and closes with SO_LINGER 0. Was: ``relay: Transport endpoint is not
    connected`` or ``relay: Connection reset by peer``."""
    target_closed = trio.Event()

    async def target(stream: trio.SocketStream) -> None:
        await stream.send_all(PAYLOAD)
        await stream.aclose()
        target_closed.set()

    ended = record_ends(engine_proxy)
    address = await start_target(nursery, target)
    with trio.fail_after(10):
        stream = await open_connect(engine_proxy, address)
        if read == "to-eof":
            assert await receive_all(stream) == PAYLOAD
        else:
            assert await receive_exactly(stream, len(PAYLOAD)) == PAYLOAD
        await target_closed.wait()
        reset(stream.socket)
        await eventually(lambda: bool(ended))
    assert ended[0].close_reason == "target closed"
    assert ended[0].counters.bytes_down == len(PAYLOAD)


async def test_half_close_to_a_target_that_reset_after_its_eof_is_a_normal_end(
    engine_proxy: Proxy, nursery: trio.Nursery
) -> None:
    """The target sends, half-closes, then resets; the client reads to EOF and only then
    sends and half-closes: passing that on fails (ENOTCONN from the shutdown, or EPIPE or
    ECONNRESET from the write, whichever comes first). The target had finished: a normal end."""
    client_got_eof, target_reset = trio.Event(), trio.Event()

    async def target(stream: trio.SocketStream) -> None:
        await stream.send_all(b"banner")
        await stream.send_eof()
        await client_got_eof.wait()
        reset(stream.socket)
        target_reset.set()

    ended = record_ends(engine_proxy)
    address = await start_target(nursery, target)
    with trio.fail_after(10):
        stream = await open_connect(engine_proxy, address)
        assert await receive_all(stream) == b"banner"
        client_got_eof.set()
        await target_reset.wait()
        try:
            await stream.send_all(b"late words")
            await stream.send_eof()
        except trio.BrokenResourceError:  # the proxy ended the relay already
            pass
        await eventually(lambda: bool(ended))
        await stream.aclose()
    assert ended[0].close_reason == "target closed"


@pytest.mark.parametrize(("who_first", "reason"), [
    ("client", "client closed"),  # the client half-closes; the echo follows suit
    ("target", "target closed"),  # the target answers and closes; then the client closes
])
async def test_clean_ends_name_the_side_that_finished_first(
    engine_proxy: Proxy, nursery: trio.Nursery, echo_server: tuple[str, int],
    who_first: str, reason: str,
) -> None:
    async def target(stream: trio.SocketStream) -> None:
        await stream.send_all(b"hello")
        await stream.aclose()

    ended = record_ends(engine_proxy)
    with trio.fail_after(10):
        if who_first == "client":
            stream = await open_connect(engine_proxy, echo_server)
            assert await echo_round_trip(stream, PAYLOAD) == PAYLOAD
        else:
            stream = await open_connect(engine_proxy, await start_target(nursery, target))
            assert await receive_all(stream) == b"hello"
        await stream.aclose()
        await eventually(lambda: bool(ended))
    assert ended[0].close_reason == reason


# --- failures keep their cause --------------------------------------------------------------


async def test_target_reset_mid_transfer_keeps_its_cause(
    engine_proxy: Proxy, nursery: trio.Nursery
) -> None:
    client_has_it = trio.Event()

    async def target(stream: trio.SocketStream) -> None:
        await stream.send_all(PAYLOAD)
        await client_has_it.wait()
        reset(stream.socket)  # no EOF: the rest of the response never comes

    ended = record_ends(engine_proxy)
    address = await start_target(nursery, target)
    with trio.fail_after(10):
        stream = await open_connect(engine_proxy, address)
        assert await receive_exactly(stream, len(PAYLOAD)) == PAYLOAD
        client_has_it.set()
        await wait_closed(stream)  # EOF or a reset: the proxy's side is over either way
        await eventually(lambda: bool(ended))
        await stream.aclose()
    assert ended[0].close_reason == "relay: target: Connection reset by peer"


async def test_client_reset_while_the_target_still_sends_keeps_its_cause(
    engine_proxy: Proxy, nursery: trio.Nursery
) -> None:
    async def target(stream: trio.SocketStream) -> None:
        try:
            for _ in range(2000):  # bounded: 600 MiB at most; the proxy cuts it short
                await stream.send_all(PAYLOAD)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    ended = record_ends(engine_proxy)
    address = await start_target(nursery, target)
    with trio.fail_after(20):
        stream = await open_connect(engine_proxy, address)
        assert await receive_exactly(stream, 1000) == PAYLOAD[:1000]
        reset(stream.socket)
        await eventually(lambda: bool(ended), limit=10)
    assert ended[0].close_reason in (
        "relay: client: Connection reset by peer", "relay: client: Broken pipe")


@pytest.mark.deadline(180)  # virtual time: the 60 s idle timeout
async def test_idle_timeout_is_the_reason(
    start_proxy: Any, echo_server: tuple[str, int], mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.autojump_threshold = 0.05
    proxy: Proxy = await start_proxy(idle_timeout=60)
    ended = record_ends(proxy)
    with trio.fail_after(120):
        stream = await open_connect(proxy, echo_server)
        assert await receive_all(stream) == b""
        await eventually(lambda: bool(ended), limit=5)
        await stream.aclose()
    assert ended[0].close_reason == "idle timeout"


# --- the pump itself ------------------------------------------------------------------------


async def tcp_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    listener = trio.socket.socket()
    with listener:
        await listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        near = trio.socket.socket()
        await near.connect(listener.getsockname())
        far, _ = await listener.accept()
    return trio.SocketStream(near), trio.SocketStream(far)


@pytest.mark.parametrize("engine", [SpliceEngine, CopyEngine], ids=["splice", "copy"])
async def test_pump_takes_enotconn_from_its_half_close_as_the_end(
    engine: Callable[[], Engine],
) -> None:
    """src's EOF comes; dst's peer has reset: ``shutdown(SHUT_WR)`` on dst fails with
    ENOTCONN, and the pump ends as at any EOF (``stop(None)``), not as a failure."""
    src, src_peer = await tcp_pair()
    dst, dst_peer = await tcp_pair()
    try:
        await src_peer.send_eof()
        reset(dst_peer.socket)
        with trio.fail_after(5):
            await trio.lowlevel.wait_readable(dst.socket)  # the reset has arrived
        with pytest.raises(OSError, match="not connected") as dead:
            dst.socket.getpeername()
        assert dead.value.errno == errno.ENOTCONN
        stops: list[BaseException | None] = []
        moved: list[int] = []
        with trio.fail_after(5):
            await engine().pump(src, dst, moved.append, stops.append)
    finally:
        for stream in (src, src_peer, dst, dst_peer):
            stream.socket.close()
    assert stops == [None]
    assert moved == []


async def test_access_line_of_a_normal_end_says_so(
    engine_proxy: Proxy, echo_server: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trisocks.access")
    with trio.fail_after(10):
        stream = await open_connect(engine_proxy, echo_server)
        assert await echo_round_trip(stream, b"ping") == b"ping"
        await stream.aclose()
        await eventually(lambda: any(r.name == "trisocks.access" for r in caplog.records))
    (line,) = [r.getMessage() for r in caplog.records if r.name == "trisocks.access"]
    assert line.endswith(' reason="client closed"') and "relay:" not in line
