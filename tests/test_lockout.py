"""One client cannot lock out the others (issue 12 §2), over loopback: a flood of stalled
handshakes from 127.0.0.1 beside clients from 127.0.0.2 (and from 127.0.0.1 itself), shorter
handshake timeouts under pressure (mock clock), per-user caps on BIND listeners and UDP
associations, the server's UDP socket budget, and an association's two UDP ports."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import (
    PASSWORD,
    USER,
    Proxy,
    assert_closed,
    connect_request,
    echo_round_trip,
    eventually,
    have_ipv6,
    read_reply,
    receive_exactly,
    socks_handshake,
)
from tests.test_bind import LOCALHOST4, bind_request
from tests.test_udp import ZEROS4, atyp_addr, header, open_udp, start_udp_echo
from trisocks.passwords import hash_password
from trisocks.policy.limits import InFlight, client_group
from trisocks.server.admission import pressure_timeout
from trisocks.store.sqlite import Store

StartProxy = Callable[..., Any]
FLOODER, OTHER = "127.0.0.1", "127.0.0.2"
STALLED_GREETING = b"\x05\x02\x02"  # two methods announced, one sent: never completes
OTHER_USER, OTHER_PASSWORD = "bob", "other-pass"


async def open_from(proxy: Proxy, source: str) -> trio.SocketStream:
    """A connection to the proxy from the loopback address *source*."""
    return await trio.open_tcp_stream(proxy.host, proxy.port, local_address=source)


def end_reasons(proxy: Proxy) -> list[str | None]:
    """The close reason of every session that ends from now on."""
    reasons: list[str | None] = []
    proxy.ctx.registry.add_listener(
        lambda event, session: reasons.append(session.close_reason) if event == "end" else None
    )
    return reasons


# --- the flood ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flood", "overrides", "limit", "cap", "evictions"),
    [
        # The case: ~1,100 idle handshakes from one address, default caps.
        pytest.param(1100, {}, "max_handshakes_per_client", 64, 1100 - 64 + 1, id="defaults"),
        pytest.param(100, {"max_handshakes_per_client": 20}, "max_handshakes_per_client", 20,
                     100 - 20 + 1, id="per-client-cap"),
        # No per-client cap: the server's cap evicts the oldest, whoever's they are.
        pytest.param(100, {"max_handshakes": 30, "max_handshakes_per_client": None},
                     "max_handshakes", 30, 100 - 30 + 1, id="global-cap"),
    ],
)
async def test_stalled_flood_from_one_address_locks_nobody_out(
    start_proxy: StartProxy,
    echo_server: tuple[str, int],
    flood: int,
    overrides: dict[str, Any],
    limit: str,
    cap: int,
    evictions: int,
) -> None:
    """*flood* stalled handshakes from 127.0.0.1; meanwhile clients from 127.0.0.2, and one
    from 127.0.0.1 itself (NAT), finish their handshakes and are served. The oldest stalled
    ones were closed to make room (and one more for the first good client to meet the full
    cap; once it is done, its slot stays free for the next)."""
    proxy = await start_proxy(handshake_timeout=600.0, **overrides)  # evictions only
    admission, stats = proxy.ctx.admission, proxy.ctx.stats
    reasons = end_reasons(proxy)
    stalled: list[trio.SocketStream] = []
    with trio.fail_after(60):
        try:
            for _ in range(flood):
                stream = await open_from(proxy, FLOODER)
                stalled.append(stream)
                await stream.send_all(STALLED_GREETING)
            await eventually(lambda: stats.limited[limit] == flood - cap, 20)
            assert admission.handshakes_from(ipaddress.ip_address(FLOODER)) == cap
            for source in (OTHER, FLOODER, OTHER):
                async with await open_from(proxy, source) as good:
                    await socks_handshake(good)
                    await good.send_all(connect_request(*echo_server))
                    assert (await read_reply(good))[0] == 0
                    assert await echo_round_trip(good, b"served") == b"served"
            assert stats.limited[limit] == evictions
            for stream in stalled[: flood - cap]:  # the oldest went first
                await assert_closed(stream)
            assert admission.handshakes == cap - 1
        finally:
            for stream in stalled:
                await stream.aclose()
        await eventually(lambda: len(proxy.ctx.registry) == 0, 20)
    assert stats.handshake_failures["evicted"] == evictions
    assert reasons.count(f"evicted: {limit}") == evictions


@pytest.mark.parametrize(
    ("load", "timeout"),
    [(0.0, 10.0), (0.25, 10.0), (0.5, 10.0), (0.75, 7.5), (1.0, 5.0), (1.5, 5.0)],
)
def test_pressure_timeout(load: float, timeout: float) -> None:
    assert pressure_timeout(10.0, load) == timeout


async def test_handshakes_get_less_time_under_pressure(
    start_proxy: StartProxy, mock_clock: trio.testing.MockClock
) -> None:
    """With a cap of 4, the 1st and 2nd stalled handshakes get the whole 10 s, the 3rd
    (load 3/4) 7.5 s, the 4th (load 1) 5 s (virtual time)."""
    mock_clock.autojump_threshold = 0.05
    proxy = await start_proxy(handshake_timeout=10.0, max_handshakes_per_client=4)
    expected = [10.0, 10.0, 7.5, 5.0]
    lifetimes: list[float | None] = [None] * len(expected)

    async def held(index: int, stream: trio.SocketStream, opened: float) -> None:
        await assert_closed(stream)
        lifetimes[index] = trio.current_time() - opened

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for index in range(len(expected)):
                stream = await open_from(proxy, FLOODER)
                opened = trio.current_time()
                await stream.send_all(STALLED_GREETING)
                await eventually(lambda n=index + 1: proxy.ctx.admission.handshakes == n)
                nursery.start_soon(held, index, stream, opened)
    for lifetime, timeout in zip(lifetimes, expected, strict=True):
        assert lifetime is not None and timeout <= lifetime < timeout + 1
    assert proxy.ctx.stats.handshake_failures["timeout"] == len(expected)
    assert proxy.ctx.stats.limited["max_handshakes_per_client"] == 0


@pytest.mark.parametrize(
    ("steps", "key_cap", "cap", "evicted", "left"),
    [
        ([("a", 1), ("a", 2), ("a", 3)], 2, None, [(1, "key")], [2, 3]),
        ([("a", 1), ("b", 2), ("a", 3)], None, 2, [(1, "all")], [2, 3]),
        ([("a", 1), ("b", 2), ("a", 3), ("a", 4)], 2, 3, [(1, "key")], [2, 3, 4]),
        ([("a", 1), ("b", 2), ("a", 3)], 2, 2, [(1, "all")], [2, 3]),
        ([("a", 1), ("a", 2), ("b", 3)], 1, 1, [(1, "key"), (2, "all")], [3]),
        ([("a", 1), ("b", 2)], 1, 1, [(1, "all")], [2]),
    ],
)
def test_in_flight_evicts_oldest(
    steps: list[tuple[str, int]],
    key_cap: int | None,
    cap: int | None,
    evicted: list[tuple[int, str]],
    left: list[int],
) -> None:
    table: InFlight[int] = InFlight()
    out = []
    for key, item in steps:
        out += table.add(item, key, key_cap=key_cap, cap=cap)
    assert out == evicted
    assert sorted(item for _, item in steps if table.remove(item)) == left
    assert len(table) == 0 and table.count("a") == 0


def test_progress_moves_a_handshake_behind_the_stalled_ones() -> None:
    table: InFlight[int] = InFlight()
    for item in (1, 2, 3):
        assert table.add(item, "a", key_cap=3, cap=None) == []
    table.touch(1)  # 1 got a message: 2 and 3 have made no progress since
    assert table.add(4, "a", key_cap=3, cap=None) == [(2, "key")]
    assert table.add(5, "a", key_cap=3, cap=None) == [(3, "key")]
    assert table.add(6, "a", key_cap=3, cap=None) == [(1, "key")]
    table.touch(99)  # not in (evicted already): nothing happens
    assert len(table) == 3


def test_ipv6_clients_are_grouped_by_64() -> None:
    one = client_group(ipaddress.ip_address("2001:db8:1:2::1"))
    assert one == client_group(ipaddress.ip_address("2001:db8:1:2:ffff::9"))
    assert one != client_group(ipaddress.ip_address("2001:db8:1:3::1"))
    assert client_group(ipaddress.ip_address("192.0.2.1")) != client_group(
        ipaddress.ip_address("192.0.2.2"))


# --- per-user caps --------------------------------------------------------------------------

UDP_REQUEST = b"\x05\x03\x00" + ZEROS4 + b"\x00\x00"
REQUESTS = {"bind": bind_request(LOCALHOST4), "udp": UDP_REQUEST}


@pytest.fixture
def second_user(store: Store) -> str:
    store.add_user(OTHER_USER, hash_password(OTHER_PASSWORD.encode()))
    return OTHER_USER


async def request_as(proxy: Proxy, who: tuple[str | None, str], command: str) -> tuple[Any, int]:
    """Handshake as *who* (user or None for no auth, source address) and send *command*'s
    request; return the stream and the (first) reply's REP."""
    user, source = who
    stream = await open_from(proxy, source)
    await socks_handshake(stream, user, OTHER_PASSWORD if user == OTHER_USER else PASSWORD)
    await stream.send_all(REQUESTS[command])
    return stream, (await read_reply(stream))[0]


ALICE, BOB = (USER, FLOODER), (OTHER_USER, FLOODER)
ANON_HERE, ANON_THERE = (None, FLOODER), (None, OTHER)


@pytest.mark.parametrize(
    ("command", "auth", "first", "second", "limit"),
    [
        pytest.param("bind", ("password",), ALICE, BOB, "user_binds", id="bind-users"),
        pytest.param("udp", ("password",), ALICE, BOB, "user_udp", id="udp-users"),
        # No auth: counted per client address, not under one anonymous key.
        pytest.param("bind", ("none",), ANON_HERE, ANON_THERE, "user_binds", id="bind-anon"),
        pytest.param("udp", ("none",), ANON_HERE, ANON_THERE, "user_udp", id="udp-anon"),
    ],
)
async def test_one_user_exhausts_its_own_cap_only(
    start_proxy: StartProxy,
    second_user: str,
    command: str,
    auth: tuple[str, ...],
    first: tuple[str | None, str],
    second: tuple[str | None, str],
    limit: str,
) -> None:
    cap = 3
    proxy = await start_proxy(auth=auth, max_binds_per_user=cap, max_udp_per_user=cap)
    stats, reservations = proxy.ctx.stats, proxy.ctx.reservations
    counts = reservations.binds if command == "bind" else reservations.udp
    user, source = first
    key = ("user", user) if user else ("client", client_group(ipaddress.ip_address(source)))
    held: list[trio.SocketStream] = []
    with trio.fail_after(20):
        try:
            for _ in range(cap + 5):  # bounded: the cap must refuse well before the end
                stream, rep = await request_as(proxy, first, command)
                if rep != 0:
                    break
                held.append(stream)
            assert (len(held), rep) == (cap, 2)  # REP 02: not allowed
            await assert_closed(stream)
            assert stats.limited[limit] == 1
            other, rep = await request_as(proxy, second, command)  # unaffected
            held.append(other)
            assert rep == 0
            await held.pop(0).aclose()  # one of the first's ends: it may open one again
            await eventually(lambda: counts[key] == cap - 1)
            stream, rep = await request_as(proxy, first, command)
            held.append(stream)
            assert rep == 0
        finally:
            for stream in held:
                await stream.aclose()
        await eventually(lambda: len(proxy.ctx.registry) == 0)
    assert stats.limited[limit] == 1
    assert stats.replies[2] == 1
    assert counts[key] == 0 and reservations.udp_sockets == 0


async def test_udp_socket_budget_is_server_wide(
    start_proxy: StartProxy, second_user: str
) -> None:
    """A budget of 5 UDP sockets is two associations (two sockets each); a third, whoever's,
    gets REP 01 (a server shortage, not the user's fault)."""
    proxy = await start_proxy(udp_sockets=5, max_udp_per_user=None)
    held: list[trio.SocketStream] = []
    with trio.fail_after(20):
        try:
            for who, expected in [(ALICE, 0), (BOB, 0), (ALICE, 1), (BOB, 1)]:
                stream, rep = await request_as(proxy, who, "udp")
                held.append(stream)
                assert rep == expected
            assert proxy.ctx.reservations.udp_sockets == 4
            await held.pop(0).aclose()
            await eventually(lambda: proxy.ctx.reservations.udp_sockets == 2)
            stream, rep = await request_as(proxy, BOB, "udp")
            held.append(stream)
            assert rep == 0
        finally:
            for stream in held:
                await stream.aclose()
    assert proxy.ctx.stats.limited["udp_sockets"] == 2
    assert proxy.ctx.stats.replies[1] == 2


# --- an association's UDP ports ---------------------------------------------------------------


def udp_sockets_of_this_process() -> int:
    """UDP sockets (IPv4 and IPv6) this process has open, from /proc."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listdir's own descriptor)
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    count = 0
    for table in ("/proc/net/udp", "/proc/net/udp6"):
        with open(table) as f:
            next(f)  # the header line
            count += sum(1 for line in f if line.split()[9] in inodes)
    return count


async def test_association_holds_two_udp_ports_for_ipv4_and_ipv6_targets(
    proxy: Proxy, nursery: trio.Nursery
) -> None:
    if not have_ipv6():
        pytest.fail("this machine has no IPv6; the dual-stack test needs ::1")
    echoes = [await start_udp_echo(nursery, "127.0.0.1"), await start_udp_echo(nursery, "::1")]
    with trio.fail_after(10), await open_udp() as client:
        before = udp_sockets_of_this_process()
        control = await proxy.open_raw()
        await socks_handshake(control)
        await control.send_all(UDP_REQUEST)
        rep, _, relay_port = await read_reply(control)
        assert rep == 0
        assert udp_sockets_of_this_process() == before + 1  # the one facing the client
        async with control:
            for echo in echoes * 2:
                datagram = header(atyp_addr(echo), echo[1]) + b"both"
                await client.sendto(datagram, ("127.0.0.1", relay_port))
                data, _ = await client.recvfrom(65536)
                assert data == datagram  # an IPv4 source is named as IPv4 (ATYP 01)
                assert udp_sockets_of_this_process() == before + 2
        await eventually(lambda: len(proxy.ctx.registry) == 0)
        assert udp_sockets_of_this_process() == before


async def test_a_handshake_waiting_on_a_password_check_is_not_evicted(
    start_proxy: Any,
) -> None:
    """While the server checks a password the handshake waits on us, not on its client: it
    holds no slot, so a flood from its own address arriving meanwhile evicts only stalled
    handshakes, never it. Here the check is held open until the cap has been refilled twice."""
    proxy = await start_proxy(max_handshakes_per_client=4)
    checking, release = trio.Event(), trio.Event()
    real_check = proxy.ctx.authenticator.check

    async def slow_check(user: bytes, password: bytes) -> Any:
        checking.set()
        await release.wait()
        return await real_check(user, password)

    proxy.ctx.authenticator.check = slow_check  # type: ignore[method-assign]
    u, p = USER.encode(), PASSWORD.encode()
    async with await proxy.open_raw() as good:
        await good.send_all(b"\x05\x01\x02")
        assert await receive_exactly(good, 2) == b"\x05\x02"
        await good.send_all(bytes([1, len(u)]) + u + bytes([len(p)]) + p)
        await checking.wait()
        stalled = [await proxy.open_raw() for _ in range(8)]  # twice the cap, all stalled
        await eventually(lambda: proxy.ctx.stats.limited["max_handshakes_per_client"] >= 4)
        release.set()
        assert await receive_exactly(good, 2) == b"\x01\x00"
        await good.send_all(connect_request("127.0.0.1", 9))
        assert (await read_reply(good))[0] in (0, 5)  # served: a reply, not an eviction
        for stream in stalled:
            await stream.aclose()
