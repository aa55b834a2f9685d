"""The relay hub (trisocks.server.hub): plain-socket relays carried by one task, through a real
server on loopback: exact bytes under backpressure, half-close, kill, idle timeout, many
sessions at once, one parked task per relaying session, and the fallbacks to pump tasks."""

from __future__ import annotations

import functools
import hashlib
import os
import socket
from typing import Any

import pytest
import trio
import trio.lowlevel
import trio.testing

from tests.conftest import (
    USER,
    Proxy,
    echo_round_trip,
    eventually,
    open_connect,
    receive_all,
    receive_exactly,
    wait_closed,
)
from tests.test_hostile import task_count
from trisocks.policy import UserLimits
from trisocks.server.hub import Hub
from trisocks.sessions import Counters
from trisocks.store.sqlite import Store

PAYLOAD = os.urandom(1 << 20) * 6  # 6 MiB: past every socket buffer, so writes block


@pytest.fixture(params=["splice", "copy"])
async def hub_proxy(request: pytest.FixtureRequest, start_proxy: Any) -> Proxy:
    proxy: Proxy = await start_proxy(relay_engine=request.param)
    assert proxy.ctx.hub is not None and proxy.ctx.hub.running
    return proxy


async def test_a_plain_session_is_carried_by_the_hub_with_one_task(
    hub_proxy: Proxy, echo_server: tuple[str, int]
) -> None:
    """While relaying, the session adds one task (its own, parked) and nothing else."""
    await trio.testing.wait_all_tasks_blocked()
    before = task_count()
    stream = await open_connect(hub_proxy, echo_server)
    await stream.send_all(b"ping")
    assert await receive_exactly(stream, 4) == b"ping"
    await trio.testing.wait_all_tasks_blocked()
    assert hub_proxy.ctx.hub is not None and len(hub_proxy.ctx.hub) == 1
    # the session's task and the echo server's handler: no pump task
    assert task_count() == before + 2
    await stream.aclose()
    await eventually(lambda: not len(hub_proxy.ctx.registry))
    assert len(hub_proxy.ctx.hub) == 0


async def test_slow_reader_gets_every_byte_in_order(
    hub_proxy: Proxy, echo_server: tuple[str, int]
) -> None:
    """A client reading slowly makes the hub hold bytes back (pending bytes or a pipe) and
    stop reading the target; nothing is lost or reordered, and the counts are exact."""
    with trio.fail_after(40):
        stream = await open_connect(hub_proxy, echo_server)
        session = next(iter(hub_proxy.ctx.registry))
        got = bytearray()

        async def send() -> None:
            await stream.send_all(PAYLOAD)
            await stream.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            while chunk := await stream.receive_some(7919):  # small reads, with pauses
                got += chunk
                if len(got) % 16 == 0:
                    await trio.lowlevel.checkpoint()
        await stream.aclose()
    assert hashlib.sha256(got).digest() == hashlib.sha256(PAYLOAD).digest()
    await eventually(lambda: not len(hub_proxy.ctx.registry))
    assert session.counters.bytes_up == session.counters.bytes_down == len(PAYLOAD)
    assert session.close_reason == "client closed"


async def test_half_close_each_way_while_the_other_flows(
    hub_proxy: Proxy, nursery: trio.Nursery
) -> None:
    """The client's EOF reaches the target as EOF while the target keeps sending; then the
    target's EOF reaches the client."""
    target_saw = trio.Event()
    received = bytearray()

    async def target(stream: trio.SocketStream) -> None:
        received.extend(await receive_all(stream))  # up to the client's EOF
        target_saw.set()
        await stream.send_all(b"after your EOF")
        await stream.send_eof()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, target, 0, host="127.0.0.1"))
    address = listeners[0].socket.getsockname()[:2]
    with trio.fail_after(10):
        stream = await open_connect(hub_proxy, address)
        await stream.send_all(b"request")
        await stream.send_eof()
        await target_saw.wait()
        assert await receive_all(stream) == b"after your EOF"
        await stream.aclose()
    assert bytes(received) == b"request"
    await eventually(lambda: not len(hub_proxy.ctx.registry))


async def test_kill_ends_a_hub_session_at_once(
    hub_proxy: Proxy, echo_server: tuple[str, int]
) -> None:
    stream = await open_connect(hub_proxy, echo_server)
    await stream.send_all(b"x")
    assert await receive_exactly(stream, 1) == b"x"
    session = next(iter(hub_proxy.ctx.registry))
    session.kill("test")
    with trio.fail_after(5):
        await wait_closed(stream)
    await stream.aclose()
    await eventually(lambda: not len(hub_proxy.ctx.registry))
    assert hub_proxy.ctx.hub is not None and len(hub_proxy.ctx.hub) == 0
    assert session.close_reason == "test"


async def test_idle_timeout_ends_only_the_idle_session(
    start_proxy: Any, echo_server: tuple[str, int]
) -> None:
    proxy: Proxy = await start_proxy(idle_timeout=0.4)
    idle = await open_connect(proxy, echo_server)
    busy = await open_connect(proxy, echo_server)
    started = trio.current_time()
    with trio.fail_after(10):
        for _ in range(10):  # 1 s of traffic, a byte every 0.1 s
            await busy.send_all(b"b")
            assert await receive_exactly(busy, 1) == b"b"
            await trio.sleep(0.1)
        await wait_closed(idle)
    await idle.aclose()
    assert trio.current_time() - started >= 0.4
    reasons = {s.close_reason for s in proxy.ctx.registry}
    assert reasons == {None}  # the busy one lives on
    await busy.send_all(b"still")
    assert await receive_exactly(busy, 5) == b"still"
    await busy.aclose()


async def test_many_sessions_at_once_keep_their_own_bytes(
    hub_proxy: Proxy, echo_server: tuple[str, int]
) -> None:
    results: dict[int, bytes] = {}

    async def one(i: int) -> None:
        stream = await open_connect(hub_proxy, echo_server)
        payload = i.to_bytes(4, "big") * (1000 + 37 * i)
        results[i] = await echo_round_trip(stream, payload)
        assert results[i] == payload
        await stream.aclose()

    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            for i in range(60):  # under max_handshakes_per_client: one client IP
                nursery.start_soon(one, i)
    assert len(results) == 60
    await eventually(lambda: not len(hub_proxy.ctx.registry))


async def test_a_target_reset_mid_response_is_the_targets_failure(
    hub_proxy: Proxy, nursery: trio.Nursery
) -> None:
    async def target(stream: trio.SocketStream) -> None:
        await stream.send_all(b"partial")
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        stream.socket.close()  # RST

    listeners = await nursery.start(functools.partial(trio.serve_tcp, target, 0, host="127.0.0.1"))
    address = listeners[0].socket.getsockname()[:2]
    stream = await open_connect(hub_proxy, address)
    session = next(iter(hub_proxy.ctx.registry))
    with trio.fail_after(10):
        await wait_closed(stream)
    await stream.aclose()
    await eventually(lambda: not len(hub_proxy.ctx.registry))
    assert session.close_reason is not None
    assert session.close_reason.startswith(("relay: target:", "target closed"))


async def test_throttled_sessions_keep_their_pump_tasks(
    start_proxy: Any, echo_server: tuple[str, int], store: Store
) -> None:
    """A user with a rate limit is relayed by pumps (they hold the throttle), not the hub."""
    store.set_user_limits(USER, UserLimits(rate_down=10_000_000))
    proxy: Proxy = await start_proxy()
    stream = await open_connect(proxy, echo_server)
    await stream.send_all(b"ping")
    assert await receive_exactly(stream, 4) == b"ping"
    assert proxy.ctx.hub is not None and len(proxy.ctx.hub) == 0
    await stream.aclose()


async def test_relays_still_carried_when_the_hub_stops_end_as_closed() -> None:
    """At shutdown the hub stops after the sessions; a relay still in it then ends as
    ``relay: closed`` rather than hanging."""
    hub = Hub()
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    client = trio.SocketStream(trio.socket.from_stdlib_socket(a))
    target = trio.SocketStream(trio.socket.from_stdlib_socket(c))
    reasons: list[str] = []

    async def relay() -> None:
        reasons.append(await hub.relay(client, target, Counters(), 60))

    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            with trio.CancelScope() as hub_scope:
                async with trio.open_nursery() as inner:
                    await inner.start(hub.run)
                    outer.start_soon(relay)
                    await trio.testing.wait_all_tasks_blocked()
                    b.send(b"hello")
                    assert await trio.to_thread.run_sync(d.recv, 5) == b"hello"
                    hub_scope.cancel()
    for s in (a, b, c, d):
        s.close()
    assert reasons == ["relay: closed"]
    assert not hub.running and len(hub) == 0
