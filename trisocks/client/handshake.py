"""The client's side of a SOCKS5 conversation: connect, negotiate a method, send a request.

Everything is read through one buffer per connection, so a reply that arrives split, or glued
to the first bytes of relayed data (or to BIND's second reply), loses nothing: what is left
after a message stays in :attr:`Control.buffer` for whoever reads next.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import attrs
import trio

from trisocks.client.errors import SocksAuthError, SocksProtocolError, SocksReplyError
from trisocks.client.gssapi import GSSAPI
from trisocks.gss.stream import GssStream
from trisocks.protocol import (
    Address,
    Command,
    Method,
    Reply,
    SocksError,
    encode_auth_request,
    encode_greeting,
    encode_request,
    parse_auth_response,
    parse_method_selection,
    parse_reply,
)

__all__ = [
    "Auth",
    "Control",
    "ProxyAddress",
    "closed_on_error",
    "connect_control",
    "parse_proxy",
]

T = TypeVar("T")

ProxyAddress = tuple[str, int] | str
"""``(host, port)``, ``"host:port"`` or ``"[v6]:port"``."""
Auth = tuple[str | bytes, str | bytes] | GSSAPI | None
"""``(username, password)`` for RFC 1929, :class:`GSSAPI` for RFC 1961, or ``None`` to offer
no authentication."""

RECEIVE_SIZE = 4096


def parse_proxy(proxy: ProxyAddress) -> tuple[str, int]:
    """Normalise the ways a caller may name the proxy.

    Raises:
        ValueError: a string without a numeric port.
    """
    if not isinstance(proxy, str):
        host, port = proxy
        return host, int(port)
    host, sep, port_text = proxy.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"proxy {proxy!r} is not HOST:PORT")
    return host.removeprefix("[").removesuffix("]"), int(port_text)


@attrs.define(eq=False)
class Control:
    """A TCP connection to the proxy and the bytes received beyond the last parsed message."""

    stream: trio.SocketStream | GssStream
    """Wrapped (a GssStream) once GSSAPI has been negotiated."""
    buffer: bytearray = attrs.Factory(bytearray)

    async def read(self, parse: Callable[[bytearray], tuple[T, int] | None]) -> T:
        """Read until *parse* finds a whole message at the front of the buffer; consume it.

        Raises:
            SocksProtocolError: the proxy sent something the parser rejects, or closed first.
        """
        while True:
            try:
                parsed = parse(self.buffer)
            except SocksError as exc:
                raise SocksProtocolError(str(exc)) from exc
            if parsed is not None:
                message, used = parsed
                del self.buffer[:used]
                return message
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                raise SocksProtocolError("the proxy closed the connection mid-conversation")
            self.buffer += data

    async def negotiate(self, auth: Auth) -> None:
        """Offer no authentication, and username/password when *auth* is given (RFC 1928 §3,
        RFC 1929); run the sub-negotiation if the proxy picks it. With :class:`GSSAPI`, offer
        only that (its exchange is :meth:`GSSAPI.establish`).

        Raises:
            SocksAuthError: no acceptable method, or the credentials were rejected.
            SocksProtocolError: the proxy picked a method that was not offered.
        """
        if isinstance(auth, GSSAPI):
            offered: tuple[Method, ...] = (Method.GSSAPI,)
        else:
            offered = (Method.NO_AUTH,) + ((Method.USERNAME_PASSWORD,) if auth else ())
        await self.stream.send_all(encode_greeting(offered))
        method = await self.read(parse_method_selection)
        if method == Method.NO_ACCEPTABLE:
            raise SocksAuthError("the proxy accepts none of the offered methods")
        if method not in offered:
            raise SocksProtocolError(f"the proxy chose method {method:#04x}, never offered")
        if method == Method.USERNAME_PASSWORD and isinstance(auth, tuple):
            await self.stream.send_all(encode_auth_request(*auth))
            if not await self.read(parse_auth_response):
                raise SocksAuthError("the proxy rejected the username or password")

    async def request(self, command: Command, address: Address) -> Address:
        """Send a request and return BND.ADDR/BND.PORT of a successful reply."""
        await self.stream.send_all(encode_request(command, address))
        return await self.read_reply()

    async def read_reply(self) -> Address:
        """Read one reply (BIND sends two); return its address if REP is 0.

        An all-zeros address, which some proxies send to mean "the address you reached me
        at", is replaced by the proxy's own address so the result is always usable.

        Raises:
            SocksReplyError: REP ≠ 0.
        """
        reply = await self.read(parse_reply)
        if reply.reply != Reply.SUCCEEDED:
            raise SocksReplyError(reply.reply)
        if reply.address.is_unspecified:
            return Address.of(self.stream.socket.getpeername()[0], reply.address.port)
        return reply.address


Connect = Callable[[], Awaitable[trio.SocketStream]]
"""How to reach the proxy, when not ``trio.open_tcp_stream(host, port)``: an async callable
that returns the connected stream (say, bound to a chosen source address first)."""


async def connect_control(proxy: ProxyAddress, auth: Auth, connect: Connect | None = None
                          ) -> Control:
    """Connect to *proxy* (through *connect* when given) and negotiate; on any failure the
    connection is closed.

    Raises:
        OSError: the proxy cannot be reached.
        SocksAuthError, SocksProtocolError: see :meth:`Control.negotiate`.
    """
    host, port = parse_proxy(proxy)
    if connect is not None:
        stream = await connect()
    else:
        stream = await trio.open_tcp_stream(host, port)
    control = Control(stream)
    async with closed_on_error(stream):
        await control.negotiate(auth)
        if isinstance(auth, GSSAPI):
            control.stream = await auth.establish(stream, control.buffer, host)
    return control


@contextlib.asynccontextmanager
async def closed_on_error(stream: trio.abc.AsyncResource) -> AsyncIterator[None]:
    """Close *stream* if the block fails (cancellation included), then let the error go on:
    for setup steps whose success hands the stream over to the caller."""
    try:
        yield
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
