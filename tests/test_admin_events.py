"""``/api/events``: the hub's batching and back-pressure rules (virtual time), the live stream,
and admin clients that stall without slowing the proxy."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing

from tests.admin_support import ADMIN, TOKEN, EventStream, admin_proxy, admin_url, api, echo_round
from tests.conftest import USER, Proxy, eventually, make_config, open_connect, wait_closed
from trisocks.admin.events import EventHub
from trisocks.admin.server import GRACEFUL_TIMEOUT, serve_with_admin
from trisocks.protocol import Address
from trisocks.sessions import Session, SessionRegistry

__all__ = ["admin_proxy", "api"]  # fixtures used by name

Echo = tuple[str, int]


def decode(message: bytes) -> tuple[str, list[str]]:
    """(event name, session ids) of one SSE message."""
    event, data = message.decode().removesuffix("\n\n").split("\n")
    ids = [s["id"] for s in json.loads(data.removeprefix("data: "))["sessions"]]
    return event.removeprefix("event: "), ids


def drain(channel: trio.MemoryReceiveChannel[bytes]) -> list[tuple[str, list[str]]]:
    messages = []
    with contextlib.suppress(trio.WouldBlock, trio.EndOfChannel):
        while True:
            messages.append(decode(channel.receive_nowait()))
    return messages


@contextlib.contextmanager
def live_session(registry: SessionRegistry) -> Iterator[Session]:
    with registry.track(Address.of("127.0.0.1", 5000)) as session:
        yield session


async def test_hub_batches_starts_updates_and_ends(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    registry = SessionRegistry()
    hub = EventHub(registry)
    await nursery.start(hub.run)
    with hub.subscribe() as events:
        assert drain(events) == [("start", [])]
        with live_session(registry) as a, live_session(registry) as b:
            await trio.sleep(0.3)
            assert drain(events) == [("start", [a.id, b.id])]
            for _ in range(300):  # a busy session changes all the time...
                a.counters.bytes_up += 1
                await trio.sleep(0.01)
            updates = drain(events)
            # ...but is sent at most once per second, and b, unchanged, never.
            assert updates == [("update", [a.id])] * 3
        with live_session(registry):  # starts and ends within one batch: never announced
            pass
        await trio.sleep(0.3)
        assert drain(events) == [("end", [b.id, a.id])]  # in the order they ended


async def test_slow_subscriber_is_dropped_not_waited_for(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    registry = SessionRegistry()
    hub = EventHub(registry, queue_size=4)
    await nursery.start(hub.run)
    with hub.subscribe() as slow, hub.subscribe() as fast:
        received = []
        for _ in range(10):
            with live_session(registry):
                await trio.sleep(0.3)  # one start and, a batch later, one end
            received += drain(fast)
        await trio.sleep(0.3)
        received += drain(fast)
        assert len(received) == 1 + 2 * 10  # the snapshot, then every start and end
        assert len(drain(slow)) == 4  # what fitted in its queue...
        assert [m async for m in slow] == []  # ...then its stream ended


async def test_close_ends_every_stream(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    hub = EventHub(SessionRegistry())
    await nursery.start(hub.run)
    with hub.subscribe() as events:
        hub.close()
        assert drain(events) == [("start", [])]
        assert [m async for m in events] == []
    with hub.subscribe() as late:
        assert [decode(m) async for m in late] == [("start", [])]


async def test_live_stream_follows_a_session(
    admin_proxy: Proxy, api: httpx.AsyncClient, echo_server: Echo
) -> None:
    with trio.fail_after(10):
        events = await EventStream.open(admin_proxy)
        try:
            assert await events.next_event() == ("start", [])
            stream = await open_connect(admin_proxy, echo_server)
            async with stream:
                event, (started,) = await events.next_event()
                assert event == "start" and started["user"] in (None, USER)
                await echo_round(stream, b"x" * 1234)

                async def counted() -> bool:
                    event, sessions = await events.next_event()
                    return event == "update" and sessions[0]["bytes_down"] == 1234

                await eventually(counted, limit=10)
                await api.delete(f"/api/sessions/{started['id']}")
                await wait_closed(stream)
            event, (ended,) = await events.next_event()
            assert (event, ended["id"], ended["bytes_up"]) == ("end", started["id"], 1234)
        finally:
            await events.aclose()


async def test_stalled_admin_clients_do_not_delay_the_proxy(
    admin_proxy: Proxy, echo_server: Echo
) -> None:
    assert admin_proxy.ctx.admin_address is not None
    with trio.fail_after(20):
        half_request = await trio.open_tcp_stream(*admin_proxy.ctx.admin_address)
        unread_events = await trio.open_tcp_stream(*admin_proxy.ctx.admin_address)
        async with half_request, unread_events:
            await half_request.send_all(b"GET /api/sessions HTTP/1.1\r\nHost: x\r\nAuthor")
            await unread_events.send_all(
                f"GET /api/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
                .encode()
            )
            stream = await open_connect(admin_proxy, echo_server)
            async with stream:
                with trio.fail_after(5):  # 8 MiB on loopback: well under a second normally
                    for _ in range(64):
                        await echo_round(stream, b"p" * 131072)
            # And the admin server still answers others meanwhile.
            async with httpx.AsyncClient(base_url=admin_url(admin_proxy)) as client:
                assert (await client.get("/healthz")).status_code == 200


async def test_shutdown_ends_open_event_streams(
    nursery: trio.Nursery, store: Any, db_path: Path
) -> None:
    config = make_config(db_path, admin=ADMIN, admin_token=TOKEN)
    with trio.fail_after(10):
        async with trio.open_nursery() as run:
            ctx = await run.start(serve_with_admin, config, store)
            events = await EventStream.open(Proxy(ctx, *ctx.listening[0]))
            try:
                assert await events.next_event() == ("start", [])
                started = trio.current_time()
                ctx.shutdown.set()
                with pytest.raises(EOFError):
                    await events.next_event()
            finally:
                await events.aclose()
        # Well inside Hypercorn's graceful timeout: the stream did not hold the stop up.
        assert trio.current_time() - started < GRACEFUL_TIMEOUT


async def test_a_thousand_busy_sessions_make_one_update_per_second(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    registry = SessionRegistry()
    hub = EventHub(registry)
    await nursery.start(hub.run)
    with contextlib.ExitStack() as stack, hub.subscribe() as events:
        sessions = [stack.enter_context(live_session(registry)) for _ in range(1000)]
        await trio.sleep(0.3)
        assert [(name, len(ids)) for name, ids in drain(events)] == [("start", 0), ("start", 1000)]
        for _ in range(10):
            for s in sessions:
                s.counters.bytes_down += 1
            await trio.sleep(0.1)
        assert [(name, len(ids)) for name, ids in drain(events)] == [("update", 1000)]


async def test_quiet_stream_gets_keepalive_comments(
    nursery: trio.Nursery, autojump_clock: trio.testing.MockClock
) -> None:
    """With nothing to report, every subscriber still hears from the server every 15 s, so
    the dashboard can tell a quiet stream from a connection that died silently."""
    hub = EventHub(SessionRegistry())
    await nursery.start(hub.run)
    with hub.subscribe() as events:
        assert drain(events) == [("start", [])]
        start = trio.current_time()
        assert await events.receive() == b": keepalive\n\n"
        assert 15 <= trio.current_time() - start <= 15.5
