"""The server end to end over loopback: handshake answers, every CONNECT reply code, relay
with half-close, timeouts and graceful shutdown."""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import socket
from collections.abc import Callable, Iterator
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
    read_reply,
    receive_all,
    receive_exactly,
    socks_handshake,
)
from trisocks.protocol import Command, Reply


async def request_reply(proxy: Proxy, request: bytes) -> tuple[trio.SocketStream, int, bytes, int]:
    stream = await proxy.open_raw()
    await socks_handshake(stream)
    await stream.send_all(request)
    rep, addr, port = await read_reply(stream)
    return stream, rep, addr, port


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- CONNECT success -----------------------------------------------------------------------


async def test_connect_ipv4_relays_and_reports_bound_address(
    proxy: Proxy, echo_server: tuple[str, int]
) -> None:
    with trio.fail_after(5):
        stream, rep, addr, port = await request_reply(proxy, connect_request(*echo_server))
        assert rep == 0
        # BND.ADDR/BND.PORT: the outbound socket's real local address, not 0.0.0.0:0.
        assert addr == b"\x01" + socket.inet_aton("127.0.0.1") and port != 0
        await stream.send_all(b"hello through the proxy")
        assert await receive_exactly(stream, 23) == b"hello through the proxy"
        await stream.aclose()


async def test_connect_ipv6_target(proxy: Proxy, echo_server6: tuple[str, int]) -> None:
    with trio.fail_after(5):
        stream, rep, addr, _ = await request_reply(proxy, connect_request(*echo_server6))
        assert rep == 0 and addr == b"\x04" + ipaddress.IPv6Address("::1").packed
        await stream.send_all(b"v6")
        assert await receive_exactly(stream, 2) == b"v6"
        await stream.aclose()


async def test_connect_domain_target_resolved_by_server(
    proxy: Proxy, echo_server: tuple[str, int]
) -> None:
    with trio.fail_after(5):
        stream, rep, _, _ = await request_reply(proxy, connect_request("localhost", echo_server[1]))
        assert rep == 0
        await stream.send_all(b"by name")
        assert await receive_exactly(stream, 7) == b"by name"
        session = next(iter(proxy.ctx.registry))
        assert str(session.target) == f"localhost:{echo_server[1]}"
        assert str(session.resolved) == f"127.0.0.1:{echo_server[1]}"
        await stream.aclose()


async def test_pipelined_handshake_and_early_payload(
    proxy: Proxy, echo_server: tuple[str, int]
) -> None:
    """Greeting, auth, request and payload in one segment: nothing is lost."""
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        u, p = USER.encode(), PASSWORD.encode()
        await stream.send_all(
            b"\x05\x01\x02" + bytes([1, len(u)]) + u + bytes([len(p)]) + p
            + connect_request(*echo_server) + b"early bytes"
        )
        assert await receive_exactly(stream, 4) == b"\x05\x02\x01\x00"
        rep, _, _ = await read_reply(stream)
        assert rep == 0
        assert await receive_exactly(stream, 11) == b"early bytes"
        await stream.aclose()


async def test_bytes_split_one_at_a_time(proxy: Proxy, echo_server: tuple[str, int]) -> None:
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        u, p = USER.encode(), PASSWORD.encode()
        await stream.send_all(b"\x05")
        await stream.send_all(b"\x01\x02")
        assert await receive_exactly(stream, 2) == b"\x05\x02"
        for byte in bytes([1, len(u)]) + u + bytes([len(p)]) + p:
            await stream.send_all(bytes([byte]))
        assert await receive_exactly(stream, 2) == b"\x01\x00"
        for byte in connect_request(*echo_server):
            await stream.send_all(bytes([byte]))
        assert (await read_reply(stream))[0] == 0
        await stream.aclose()


async def test_half_close_client_still_receives_everything(
    proxy: Proxy, echo_server: tuple[str, int]
) -> None:
    """The client shuts its write side; the echo arrives in full, then EOF."""
    payload = bytes(range(256)) * 4096  # 1 MiB
    with trio.fail_after(10):
        stream, rep, _, _ = await request_reply(proxy, connect_request(*echo_server))
        assert rep == 0

        received = await echo_round_trip(stream, payload)
        assert hashlib.sha256(received).digest() == hashlib.sha256(payload).digest()
        await stream.aclose()
    await eventually(lambda: not len(proxy.ctx.registry))


async def test_counters_are_payload_bytes(proxy: Proxy, echo_server: tuple[str, int]) -> None:
    with trio.fail_after(5):
        stream, _, _, _ = await request_reply(proxy, connect_request(*echo_server))
        session = next(iter(proxy.ctx.registry))
        await stream.send_all(b"x" * 1000)
        await receive_exactly(stream, 1000)
        assert session.counters.bytes_up == 1000 and session.counters.bytes_down == 1000
        assert session.user == USER and session.command == Command.CONNECT
        await stream.aclose()


# --- CONNECT failures: one reply code each ------------------------------------------------


async def test_refused_is_05_and_connection_closes(proxy: Proxy) -> None:
    with trio.fail_after(5):
        stream, rep, _, _ = await request_reply(proxy, connect_request("127.0.0.1", closed_port()))
        assert rep == Reply.CONNECTION_REFUSED
        await assert_closed(stream)


class FailingSocketFactory(trio.abc.SocketFactory):
    """Outbound sockets whose connect fails with a chosen errno (for codes that loopback
    cannot produce for real: network/host unreachable)."""

    def __init__(self, code: int) -> None:
        self.code = code

    def socket(self, family: Any = None, type: Any = None, proto: Any = None) -> Any:
        code = self.code

        class Failing:
            def setsockopt(self, *args: object) -> None:
                pass

            async def connect(self, address: object) -> None:
                await trio.lowlevel.checkpoint()
                raise OSError(code, errno.errorcode[code])

            def close(self) -> None:
                pass

        return Failing()


@pytest.mark.parametrize(
    ("code", "reply"),
    [
        (errno.ENETUNREACH, Reply.NETWORK_UNREACHABLE),
        (errno.EHOSTUNREACH, Reply.HOST_UNREACHABLE),
        (errno.ECONNREFUSED, Reply.CONNECTION_REFUSED),
        (errno.ETIMEDOUT, Reply.TTL_EXPIRED),
        (errno.EIO, Reply.GENERAL_FAILURE),
    ],
    ids=["net-unreach-03", "host-unreach-04", "refused-05", "etimedout-06", "other-01"],
)
async def test_connect_errno_maps_to_reply(proxy: Proxy, code: int, reply: Reply) -> None:
    with trio.fail_after(5):
        stream = await proxy.open_raw()  # opened before the factory takes over
        trio.socket.set_custom_socket_factory(FailingSocketFactory(code))
        try:
            await socks_handshake(stream)
            await stream.send_all(connect_request("127.0.0.1", 9))
            rep, _, _ = await read_reply(stream)
        finally:
            trio.socket.set_custom_socket_factory(None)
        assert rep == reply
        await assert_closed(stream)


async def test_unresolvable_name_is_04(loopback_dns: None, proxy: Proxy) -> None:
    with trio.fail_after(5):
        stream, rep, _, _ = await request_reply(proxy, connect_request("no-such.invalid", 80))
        assert rep == Reply.HOST_UNREACHABLE
        await assert_closed(stream)


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A loopback port whose accept queue is full: new SYNs are dropped, connects hang."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    yield port
    for s in fillers:
        s.close()
    listener.close()


async def test_connect_timeout_is_06(start_proxy: Any, blackhole: int) -> None:
    proxy = await start_proxy(connect_timeout=0.5)
    with trio.fail_after(5):
        start = trio.current_time()
        stream, rep, _, _ = await request_reply(proxy, connect_request("127.0.0.1", blackhole))
        assert rep == Reply.TTL_EXPIRED
        assert trio.current_time() - start >= 0.5
        await assert_closed(stream)


@pytest.mark.parametrize(
    ("request_bytes", "reply"),
    [
        (b"\x05\x04\x00\x01\x7f\x00\x00\x01\x00\x50", Reply.COMMAND_NOT_SUPPORTED),
        (b"\x05\x01\x00\x05\x7f\x00\x00\x01\x00\x50", Reply.ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x05\x01\x07\x01\x7f\x00\x00\x01\x00\x50", Reply.GENERAL_FAILURE),
        (b"\x05\x01\x00\x03\x00\x00\x50", Reply.GENERAL_FAILURE),
    ],
    ids=["cmd-04-is-07", "atyp-05-is-08", "rsv-is-01", "empty-domain-is-01"],
)
async def test_bad_requests_get_their_reply_then_close(
    proxy: Proxy, request_bytes: bytes, reply: Reply
) -> None:
    with trio.fail_after(5):
        stream, rep, _, _ = await request_reply(proxy, request_bytes)
        assert rep == reply
        await assert_closed(stream)


# --- method negotiation and RFC 1929 --------------------------------------------------------


@pytest.mark.parametrize(
    "greeting", [b"\x05\x01\x00", b"\x05\x00", b"\x05\x02\x01\x80"],
    ids=["only-none", "nmethods-0", "gssapi-and-private"],
)
async def test_no_acceptable_method_is_ff(proxy: Proxy, greeting: bytes) -> None:
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        await stream.send_all(greeting)
        assert await receive_exactly(stream, 2) == b"\x05\xff"
        await assert_closed(stream)
    assert proxy.ctx.stats.handshake_failures["no_acceptable_method"] == 1


@pytest.mark.parametrize(
    ("first", "protocols"),
    [(b"\x06\x01\x00", ("socks5", "socks4", "http")),
     (b"\x04\x01\x00\x50\x7f\x00\x00\x01\x00", ("socks5", "http"))],  # SOCKS4, not enabled
    ids=["version-6", "socks4-disabled"],
)
async def test_wrong_version_closes_without_answer(
    start_proxy: Callable[..., Any], first: bytes, protocols: tuple[str, ...]
) -> None:
    proxy = await start_proxy(protocols=protocols)
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        await stream.send_all(first)
        await assert_closed(stream)
    assert proxy.ctx.stats.handshake_failures["unknown_protocol"] == 1


@pytest.mark.parametrize(
    "auth",
    [b"\x01\x05alice\x05wrong", b"\x01\x03bob\x0bs3cret-pass", b"\x05\x05alice\x0bs3cret-pass",
     b"\x01\x00\x0bs3cret-pass"],
    ids=["wrong-password", "unknown-user", "subnegotiation-ver-5", "empty-name"],
)
async def test_auth_failure_answers_01_01_and_closes(proxy: Proxy, auth: bytes) -> None:
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        await stream.send_all(b"\x05\x01\x02")
        assert await receive_exactly(stream, 2) == b"\x05\x02"
        await stream.send_all(auth)
        assert await receive_exactly(stream, 2) == b"\x01\x01"
        await assert_closed(stream)
    assert proxy.ctx.stats.handshake_failures["auth_failed"] == 1


async def test_auth_none_when_configured(
    start_proxy: Any, echo_server: tuple[str, int]
) -> None:
    proxy = await start_proxy(auth=("none",))
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        await socks_handshake(stream, user=None)
        await stream.send_all(connect_request(*echo_server))
        assert (await read_reply(stream))[0] == 0
        await stream.aclose()


async def test_server_preference_order(start_proxy: Any) -> None:
    """With both offered, the server picks by its own order of preference."""
    proxy = await start_proxy(auth=("password", "none"))
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        await stream.send_all(b"\x05\x02\x00\x02")
        assert await receive_exactly(stream, 2) == b"\x05\x02"
        await stream.aclose()


# --- timeouts and shutdown ------------------------------------------------------------------


async def test_handshake_timeout_closes_silent_client(
    start_proxy: Any, mock_clock: trio.testing.MockClock
) -> None:
    """A client that connects and says nothing is dropped after handshake_timeout (virtual
    time: the clock jumps once the real sockets have been idle for 50 ms)."""
    mock_clock.autojump_threshold = 0.05
    proxy = await start_proxy(handshake_timeout=10)
    stream = await proxy.open_raw()
    start = trio.current_time()
    with trio.fail_after(30):
        await assert_closed(stream)
    assert 10 <= trio.current_time() - start < 11
    assert proxy.ctx.stats.handshake_failures["timeout"] == 1


@pytest.mark.deadline(180)  # virtual time: 30 s, then the 60 s idle timeout
async def test_idle_relay_times_out(
    start_proxy: Any, echo_server: tuple[str, int], mock_clock: trio.testing.MockClock
) -> None:
    mock_clock.autojump_threshold = 0.05
    proxy = await start_proxy(idle_timeout=60)
    stream, rep, _, _ = await request_reply(proxy, connect_request(*echo_server))
    assert rep == 0
    start = trio.current_time()
    await trio.sleep(30)
    await stream.send_all(b"still alive")  # activity moves the idle deadline...
    assert await receive_exactly(stream, 11) == b"still alive"
    last = trio.current_time()
    with trio.fail_after(120):
        await assert_closed(stream)
    # ...so the relay ends idle_timeout after the last byte (up to 1 s late, never early)
    assert 60 <= trio.current_time() - last <= 61
    assert trio.current_time() - start >= 90


async def test_graceful_shutdown_drains_then_stops(
    nursery: trio.Nursery, store: Any, db_path: Any, echo_server: tuple[str, int]
) -> None:
    from tests.conftest import make_config
    from trisocks.admin.server import serve_with_admin

    done = trio.Event()

    async def run(task_status: Any) -> None:
        config = make_config(db_path, shutdown_grace=5)
        await serve_with_admin(config, store, task_status=task_status)
        done.set()

    ctx = await nursery.start(run)
    proxy = Proxy(ctx, *ctx.listening[0][:2])
    with trio.fail_after(10):
        stream, rep, _, _ = await request_reply(proxy, connect_request(*echo_server))
        assert rep == 0
        ctx.shutdown.set()
        await trio.sleep(0.1)
        # The listener is closed: a new client cannot connect...
        with pytest.raises(OSError, match=r"refused|failed"):
            await proxy.open_raw()
        # ...but the live session still relays until its client is done.
        await stream.send_all(b"still here")
        assert await receive_exactly(stream, 10) == b"still here"
        assert not done.is_set()
        await stream.send_eof()
        assert await receive_all(stream) == b""
        await stream.aclose()
        await done.wait()


async def test_shutdown_grace_cancels_stragglers(
    nursery: trio.Nursery, store: Any, db_path: Any, echo_server: tuple[str, int],
    mock_clock: trio.testing.MockClock,
) -> None:
    from tests.conftest import make_config
    from trisocks.admin.server import serve_with_admin

    mock_clock.autojump_threshold = 0.05
    ctx = await nursery.start(serve_with_admin, make_config(db_path, shutdown_grace=7), store)
    proxy = Proxy(ctx, *ctx.listening[0][:2])
    stream, rep, _, _ = await request_reply(proxy, connect_request(*echo_server))
    assert rep == 0
    start = trio.current_time()
    ctx.shutdown.set()
    with trio.fail_after(30):
        await assert_closed(stream)
    assert 7 <= trio.current_time() - start < 8


@pytest.mark.parametrize(
    "name",
    ["a" * 255, "a" * 64 + ".example", "a..example", "\u00e9" * 100],
    ids=["255-byte-label", "64-byte-label", "empty-label", "unencodable-idna"],
)
async def test_names_idna_rejects_are_04_and_server_lives(
    proxy: Proxy, echo_server: tuple[str, int], name: str
) -> None:
    """RFC 1928 allows any 1..255-byte DST.ADDR; Python's getaddrinfo raised UnicodeError (not
    an OSError) for labels the idna codec refuses, and that took the whole server down."""
    with trio.fail_after(5):
        stream, rep, _, _ = await request_reply(proxy, connect_request(name, 80))
        assert rep == Reply.HOST_UNREACHABLE
        await assert_closed(stream)
        stream, rep, _, _ = await request_reply(proxy, connect_request(*echo_server))
        assert rep == Reply.SUCCEEDED
        await stream.aclose()


async def test_a_failing_session_does_not_stop_the_server(
    proxy: Proxy, echo_server: tuple[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any exception a session did not expect ends that session only (it used to escape to
    the accept loop's nursery and end the whole server)."""
    from trisocks.protocol import Command
    from trisocks.server import session as session_module

    async def broken(*args: Any) -> None:
        raise RuntimeError("boom")

    monkeypatch.setitem(session_module.HANDLERS, Command.BIND, broken)
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        await socks_handshake(stream)
        await stream.send_all(connect_request("127.0.0.1", 1, cmd=2))
        await assert_closed(stream)
        stream, rep, _, _ = await request_reply(proxy, connect_request(*echo_server))
        assert rep == Reply.SUCCEEDED
        await stream.aclose()


async def test_failure_reply_then_clean_close_despite_unread_payload(proxy: Proxy) -> None:
    """Payload pipelined behind a request that gets a failure reply is read away before the
    close, so the client sees the reply and then a FIN, not a TCP reset."""
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        await socks_handshake(stream)
        await stream.send_all(
            b"\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50" + b"x" * 100_000  # CMD 09 + payload
        )
        rep, _, _ = await read_reply(stream)
        assert rep == Reply.COMMAND_NOT_SUPPORTED
        assert await stream.receive_some(100) == b""  # EOF, not ConnectionResetError
        await stream.aclose()
