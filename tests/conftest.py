"""Rules of this suite:

1. Every target is on loopback (127.0.0.1 or ::1); every server a test needs is started by the
   test (or a fixture) on port 0 and stopped by it.
2. Async tests run under pytest-trio (``trio_mode``); each has a deadline so a hang fails fast
   instead of stalling CI: :func:`pytest_collection_modifyitems` runs every async test inside
   ``DEADLINE`` seconds of trio time (virtual time under the autojump clock); a slow test says
   so with ``@pytest.mark.deadline(seconds)``. Tests may keep tighter ``fail_after`` blocks.
3. Real sockets for end-to-end behaviour, in-memory streams and the autojump clock for timing.
"""

from __future__ import annotations

import functools
import inspect
import ipaddress
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

import trisocks.passwords
from trisocks.admin.server import serve_with_admin
from trisocks.config import Config, Endpoint
from trisocks.passwords import hash_password
from trisocks.server.context import ServerContext
from trisocks.store.sqlite import Store

USER, PASSWORD = "alice", "s3cret-pass"

DEADLINE = 60.0
"""Seconds (of trio time) an async test may run unless marked ``@pytest.mark.deadline(s)``."""

CHEAP_LOG2_N = 4
"""The scrypt cost (log2 n) the suite hashes with; stored hashes carry their cost, so verifying
works the same. A test marked ``@pytest.mark.production_scrypt`` sees the production cost."""


def _with_deadline(test: Callable[..., Any], seconds: float, nodeid: str) -> Callable[..., Any]:
    """*test* (an async test function) run inside a ``seconds`` cancel scope; running out fails
    the test with a message naming the deadline. ``functools.wraps`` keeps the signature, so
    pytest and pytest-trio still see the test's fixtures."""

    @functools.wraps(test)
    async def run_with_deadline(*args: Any, **kwargs: Any) -> None:
        __tracebackhide__ = True
        with trio.move_on_after(seconds) as scope:
            await test(*args, **kwargs)
        if scope.cancelled_caught:
            pytest.fail(
                f"{nodeid} did not finish within its deadline of {seconds:g} s of trio time "
                "(conftest DEADLINE; a slow test says @pytest.mark.deadline(seconds))",
                pytrace=False,
            )

    return run_with_deadline


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every async test function a deadline (see :func:`_with_deadline`)."""
    for item in items:
        if not isinstance(item, pytest.Function) or not inspect.iscoroutinefunction(item.obj):
            continue
        marker = item.get_closest_marker("deadline")
        seconds = float(marker.args[0]) if marker else DEADLINE
        item.obj = _with_deadline(item.obj, seconds, item.nodeid)


@pytest.fixture(autouse=True)
def cheap_scrypt(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Hash passwords in this process with :data:`CHEAP_LOG2_N` (logins then cost microseconds,
    not tens of milliseconds); the production default in trisocks.passwords is unchanged."""
    if request.node.get_closest_marker("production_scrypt") is None:
        monkeypatch.setattr(trisocks.passwords, "_LOG2_N", CHEAP_LOG2_N)


def curl() -> str:
    """The curl program (scripts/test installs it; missing, the test fails rather than skips)."""
    path = shutil.which("curl")
    if path is None:
        pytest.fail("curl is not installed (scripts/test installs it with apt-get)")
    return path


async def run_curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    """curl with *args* (proxy flags and a URL), silent but for errors, bounded to 20 s; the
    caller checks the exit status (97: the proxy refused the login)."""
    return await trio.run_process(
        [curl(), "--silent", "--show-error", "--max-time", "20", *args],
        capture_stdout=True, capture_stderr=True, check=False)


def have_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "trisocks.db"


@pytest.fixture
def store(db_path: Path) -> Store:
    s = Store(db_path)
    s.add_user(USER, hash_password(PASSWORD.encode()))
    yield s
    s.close()


@attrs.define
class Proxy:
    """A running trisocks in the test's nursery."""

    ctx: ServerContext
    host: str
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    async def open_raw(self) -> trio.SocketStream:
        return await trio.open_tcp_stream(self.host, self.port)


def make_config(db_path: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = {
        "listen": (Endpoint("127.0.0.1", 0),),
        "db": db_path,
        "admin": None,
        "auth": ("password",),
    }
    values.update(overrides)
    return Config(**values)


@pytest.fixture
def start_proxy(
    nursery: trio.Nursery, store: Store, db_path: Path
) -> Callable[..., Any]:
    """``await start_proxy(**config_overrides)`` -> Proxy (stopped with the test's nursery)."""

    async def start(**overrides: Any) -> Proxy:
        config = make_config(db_path, **overrides)
        ctx = await nursery.start(serve_with_admin, config, store)
        host, port = ctx.listening[0][:2]
        return Proxy(ctx, host, port)

    return start


@pytest.fixture
async def proxy(start_proxy: Callable[..., Any]) -> Proxy:
    return await start_proxy()


async def _echo(stream: trio.SocketStream) -> None:
    try:
        async for chunk in stream:
            await stream.send_all(chunk)
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


@pytest.fixture
async def echo_server(nursery: trio.Nursery) -> tuple[str, int]:
    """A TCP echo server on 127.0.0.1 that half-closes after the client does."""
    listeners = await nursery.start(functools.partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[:2]


@pytest.fixture
async def echo_server6(nursery: trio.Nursery) -> tuple[str, int]:
    if not have_ipv6():
        pytest.fail("this machine has no IPv6 loopback; the IPv6 tests need ::1")
    listeners = await nursery.start(functools.partial(trio.serve_tcp, _echo, 0, host="::1"))
    return listeners[0].socket.getsockname()[:2]


async def receive_exactly(stream: trio.abc.ReceiveStream, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(n - len(data))
        if not chunk:
            raise EOFError(f"EOF after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


async def receive_all(stream: trio.abc.ReceiveStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    return bytes(data)


def connect_request(host: str, port: int, cmd: int = 1) -> bytes:
    """A request for *cmd* (CONNECT by default) to *host*: an IP literal or a domain name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode()
        return bytes([5, cmd, 0, 3, len(name)]) + name + port.to_bytes(2, "big")
    atyp = b"\x01" if ip.version == 4 else b"\x04"
    return bytes([5, cmd, 0]) + atyp + ip.packed + port.to_bytes(2, "big")


async def open_connect(
    proxy: Proxy | tuple[str, int],
    target: tuple[str, int],
    user: str | None = USER,
    password: str = PASSWORD,
) -> trio.SocketStream:
    """A CONNECT through *proxy* to *target*, past its success reply."""
    address = proxy.address if isinstance(proxy, Proxy) else proxy
    stream = await trio.open_tcp_stream(*address)
    await socks_handshake(stream, user, password)
    await stream.send_all(connect_request(*target))
    rep, _, _ = await read_reply(stream)
    assert rep == 0, f"CONNECT answered REP {rep:#04x}"
    return stream


async def echo_round_trip(stream: trio.SocketStream, payload: bytes) -> bytes:
    """Send *payload* and half-close while reading everything the far end sends back."""

    async def send() -> None:
        await stream.send_all(payload)
        await stream.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        return await receive_all(stream)


async def socks_handshake(
    stream: trio.SocketStream, user: str | None = USER, password: str | None = PASSWORD
) -> None:
    """Greeting and (with a user) RFC 1929 auth, checked byte for byte."""
    if user is None:
        await stream.send_all(b"\x05\x01\x00")
        assert await receive_exactly(stream, 2) == b"\x05\x00"
        return
    await stream.send_all(b"\x05\x01\x02")
    assert await receive_exactly(stream, 2) == b"\x05\x02"
    u, p = user.encode(), password.encode() if password else b""
    await stream.send_all(bytes([1, len(u)]) + u + bytes([len(p)]) + p)
    assert await receive_exactly(stream, 2) == b"\x01\x00"


async def read_reply(stream: trio.abc.ReceiveStream) -> tuple[int, bytes, int]:
    """Read one reply; return (REP, raw address bytes incl. ATYP, port)."""
    head = await receive_exactly(stream, 4)
    assert head[0] == 5 and head[2] == 0, head
    atyp = head[3]
    if atyp == 1:
        addr = await receive_exactly(stream, 4)
    elif atyp == 4:
        addr = await receive_exactly(stream, 16)
    else:
        n = await receive_exactly(stream, 1)
        addr = n + await receive_exactly(stream, n[0])
    port = int.from_bytes(await receive_exactly(stream, 2), "big")
    return head[1], bytes([atyp]) + addr, port


@attrs.frozen
class HttpOrigin:
    host: str
    port: int
    body: bytes

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/blob"


async def _serve_blob(body: bytes, stream: trio.SocketStream) -> None:
    """A minimal HTTP/1.1 server: any GET gets *body*, then the connection closes."""
    try:
        request = b""
        while b"\r\n\r\n" not in request:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            request += chunk
        head = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
        )
        await stream.send_all(head + body)
    except (trio.BrokenResourceError, OSError):
        pass
    finally:
        await stream.aclose()


BLOB = bytes(range(256)) * (6 * 4096)  # 6 MiB, patterned so a reorder changes the hash


@pytest.fixture
async def http_origin(nursery: trio.Nursery) -> HttpOrigin:
    """An HTTP server on 127.0.0.1 serving a 6 MiB blob at /blob."""
    handler = functools.partial(_serve_blob, BLOB)
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    host, port = listeners[0].socket.getsockname()[:2]
    return HttpOrigin(host, port, BLOB)


async def eventually(check: Callable[[], Any], limit: float = 2.0, interval: float = 0.005) -> Any:
    """Poll *check* (sync or async) until it returns something truthy, and return that; fail
    (``trio.TooSlowError``) after *limit* seconds.

    For what changes without an event to wait on: counters, fd tables, another task's state."""
    with trio.fail_after(limit):
        while True:
            result = check()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            await trio.sleep(interval)


async def wait_closed(stream: trio.abc.ReceiveStream, *, reset_ok: bool = True) -> bytes:
    """Read *stream* until the peer has closed it (EOF, or also a reset if *reset_ok*) and
    return what arrived before that."""
    data = bytearray()
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except trio.BrokenResourceError:
        if not reset_ok:
            raise
    return bytes(data)


async def assert_closed(stream: trio.abc.Stream, *, reset_ok: bool = True) -> None:
    """The peer closes *stream* without sending anything more (:func:`wait_closed`); then it is
    closed here too."""
    try:
        assert await wait_closed(stream, reset_ok=reset_ok) == b""
    finally:
        await stream.aclose()


class LoopbackResolver(trio.abc.HostnameResolver):
    """Names under ``.invalid`` never resolve; names under ``.trisocks.test`` resolve to
    127.0.0.1 (so tests can make the proxy resolve a name no client resolves locally);
    everything else goes to the system resolver."""

    async def getaddrinfo(self, host: Any, port: Any, *args: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name.endswith(".invalid"):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if name.endswith(".trisocks.test"):
            host = "127.0.0.1"
        return await trio.to_thread.run_sync(socket.getaddrinfo, host, port, *args)

    async def getnameinfo(self, sockaddr: Any, flags: int) -> Any:
        return await trio.to_thread.run_sync(socket.getnameinfo, sockaddr, flags)


@pytest.fixture
async def loopback_dns() -> AsyncIterator[None]:
    """Install :class:`LoopbackResolver` in this test's trio run. Request it as an argument:
    pytest-trio does not run async fixtures named only in ``usefixtures``."""
    trio.socket.set_custom_hostname_resolver(LoopbackResolver())
    yield
    trio.socket.set_custom_hostname_resolver(None)
