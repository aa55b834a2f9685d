"""Fixtures and helpers of the admin API tests (imported by the other ``test_admin_*`` files;
no tests here).

Rules on top of conftest's: every admin server is started on 127.0.0.1 port 0 through
``start_proxy(admin=...)``; event streams are read with a raw HTTP/1.0 request (httpx's
streaming iterators leave generators to the garbage collector, which trio reports).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import Proxy, eventually, receive_exactly
from trisocks.config import Endpoint

TOKEN = "test-token-0123456789"
ADMIN = Endpoint("127.0.0.1", 0)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def socket_count() -> int:
    """Open sockets of this process (fds whose link reads ``socket:[inode]``)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except FileNotFoundError:  # the fd listdir itself used
            pass
    return count


def admin_url(proxy: Proxy) -> str:
    assert proxy.ctx.admin_address is not None
    host, port = proxy.ctx.admin_address
    return f"http://{host}:{port}"


@pytest.fixture
async def admin_proxy(start_proxy: Callable[..., Any]) -> Proxy:
    """A proxy with its admin API on an ephemeral port and the token ``TOKEN``."""
    return await start_proxy(admin=ADMIN, admin_token=TOKEN)


@pytest.fixture
async def api(admin_proxy: Proxy) -> AsyncIterator[httpx.AsyncClient]:
    """An authenticated client of ``admin_proxy``'s API."""
    async with httpx.AsyncClient(
        base_url=admin_url(admin_proxy), headers={"Authorization": f"Bearer {TOKEN}"}
    ) as client:
        yield client


async def auth_status(proxy: Proxy, user: str, password: str) -> int:
    """The RFC 1929 STATUS byte *proxy* answers to these credentials (0 is success)."""
    async with await proxy.open_raw() as stream:
        await stream.send_all(b"\x05\x01\x02")
        assert await receive_exactly(stream, 2) == b"\x05\x02"
        u, p = user.encode(), password.encode()
        await stream.send_all(bytes([1, len(u)]) + u + bytes([len(p)]) + p)
        return (await receive_exactly(stream, 2))[1]


async def echo_round(stream: trio.SocketStream, payload: bytes) -> None:
    """Send *payload* to an echo target and read it all back."""
    await stream.send_all(payload)
    received = bytearray()
    while len(received) < len(payload):
        chunk = await stream.receive_some(65536)
        assert chunk, "EOF in the middle of an echo"
        received += chunk
    assert received == payload


async def session_of(api: httpx.AsyncClient, **filters: str) -> dict[str, Any]:
    """The one live session matching *filters*, once it is relaying."""

    async def relaying() -> dict[str, Any] | None:
        sessions = (await api.get("/api/sessions", params=filters)).json()["sessions"]
        assert len(sessions) <= 1, sessions
        return sessions[0] if sessions and sessions[0]["state"] == "relaying" else None

    return await eventually(relaying, limit=10)  # type: ignore[no-any-return]


class EventStream:
    """``GET /api/events`` over a raw socket: ``await next_event()`` -> (event, sessions)."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self._buffer = b""

    @classmethod
    async def open(cls, proxy: Proxy, token: str = TOKEN) -> EventStream:
        assert proxy.ctx.admin_address is not None
        stream = await trio.open_tcp_stream(*proxy.ctx.admin_address)
        await stream.send_all(
            f"GET /api/events HTTP/1.0\r\nAuthorization: Bearer {token}\r\n\r\n".encode()
        )
        events = cls(stream)
        head = await events._until(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        assert b"text/event-stream" in head
        return events

    async def _until(self, separator: bytes) -> bytes:
        while separator not in self._buffer:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                raise EOFError("event stream ended")
            self._buffer += chunk
        item, self._buffer = self._buffer.split(separator, 1)
        return item

    async def next_event(self) -> tuple[str, list[dict[str, Any]]]:
        fields = dict(
            line.split(": ", 1) for line in (await self._until(b"\n\n")).decode().splitlines()
        )
        return fields["event"], json.loads(fields["data"])["sessions"]

    async def aclose(self) -> None:
        await self.stream.aclose()
