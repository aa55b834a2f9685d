"""Both relay engines (splice and copy): large transfers by hash, half-close, a peer that
resets mid-transfer, and running out of file descriptors in the middle of a relay."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import resource
import socket
import struct
from collections.abc import Iterator
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
)
from trisocks.server.engines import SpliceEngine

ENGINES = ["splice", "copy"]
PAYLOAD = os.urandom(1 << 20) * 8  # 8 MiB


@pytest.fixture(params=ENGINES)
async def engine_proxy(request: pytest.FixtureRequest, start_proxy: Any) -> Proxy:
    proxy: Proxy = await start_proxy(relay_engine=request.param)
    assert proxy.ctx.engine.name == request.param
    return proxy


async def test_large_transfer_both_ways_by_hash(
    engine_proxy: Proxy, echo_server: tuple[str, int]
) -> None:
    with trio.fail_after(30):
        stream = await open_connect(engine_proxy, echo_server)

        echoed = await echo_round_trip(stream, PAYLOAD)
        await stream.aclose()
    assert hashlib.sha256(echoed).digest() == hashlib.sha256(PAYLOAD).digest()
    await eventually(lambda: not len(engine_proxy.ctx.registry))


async def test_half_close_from_the_target_side(
    engine_proxy: Proxy, nursery: trio.Nursery
) -> None:
    """The target sends a response and shuts its write side; the client still sends, and the
    target still receives everything after its own EOF."""
    got = trio.Event()
    received = bytearray()

    async def target(stream: trio.SocketStream) -> None:
        await stream.send_all(b"banner then EOF")
        await stream.send_eof()
        received.extend(await receive_all(stream))
        got.set()
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, target, 0, host="127.0.0.1"))
    with trio.fail_after(10):
        stream = await open_connect(engine_proxy, listeners[0].socket.getsockname()[:2])
        assert await receive_all(stream) == b"banner then EOF"
        await stream.send_all(b"client keeps talking")
        await stream.send_eof()
        await got.wait()
        await stream.aclose()
    assert bytes(received) == b"client keeps talking"


def reset(sock: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_target_reset_mid_transfer_ends_only_that_session(
    engine_proxy: Proxy, nursery: trio.Nursery, echo_server: tuple[str, int]
) -> None:
    async def target(stream: trio.SocketStream) -> None:
        await stream.send_all(b"x" * 100_000)
        await trio.sleep(0.05)
        reset(stream.socket._sock)  # type: ignore[attr-defined]

    listeners = await nursery.start(functools.partial(trio.serve_tcp, target, 0, host="127.0.0.1"))
    with trio.fail_after(10):
        stream = await open_connect(engine_proxy, listeners[0].socket.getsockname()[:2])
        got = 0
        with contextlib.suppress(trio.BrokenResourceError):
            while chunk := await stream.receive_some(65536):
                got += len(chunk)
        assert got <= 100_000
        await stream.aclose()
        await eventually(lambda: not len(engine_proxy.ctx.registry))
        # the server is unharmed
        other = await open_connect(engine_proxy, echo_server)
        await other.send_all(b"ok")
        assert await receive_exactly(other, 2) == b"ok"
        await other.aclose()


@contextlib.contextmanager
def no_free_fds() -> Iterator[None]:
    """Lower RLIMIT_NOFILE so that this process cannot open a single new descriptor."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    fillers = []
    try:
        highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
        while True:  # fill the holes below the highest fd, so the next fd is highest + 1
            fd = os.open(os.devnull, os.O_RDONLY)
            fillers.append(fd)
            if fd >= highest:
                break
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd + 1, hard))
        with pytest.raises(OSError, match="Too many open files"):
            os.pipe()
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for fd in fillers:
            os.close(fd)


async def test_out_of_fds_mid_relay_keeps_relaying(
    engine_proxy: Proxy, echo_server: tuple[str, int]
) -> None:
    """With no descriptor left (so no pipe for splice), established sessions keep moving
    bytes, exactly."""
    data = PAYLOAD[: 2 << 20]
    with trio.fail_after(30):
        stream = await open_connect(engine_proxy, echo_server)
        await stream.send_all(b"warm-up")
        assert await receive_exactly(stream, 7) == b"warm-up"
        session = next(iter(engine_proxy.ctx.registry))
        hub = engine_proxy.ctx.hub
        assert hub is not None and len(hub) == 1  # the hub carries it (no throttle)
        hub.drop_pipes()  # nothing pooled: a pipe would have to be made now
        with no_free_fds():
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream.send_all, data)
                echoed = await receive_exactly(stream, len(data))
        await stream.aclose()
    assert echoed == data
    if isinstance(engine_proxy.ctx.engine, SpliceEngine):
        assert hub.fallback_chunks > 0
    assert session.counters.bytes_up == len(data) + 7
    assert session.counters.bytes_down == len(data) + 7
