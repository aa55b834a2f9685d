"""The server's side of the handshake: greeting, optional RFC 1929 auth, request.

Reading works on a buffer, so split messages, and messages (or payload) that arrive together,
are both fine; whatever follows the request is handed on as ``leftover``. After GSSAPI (RFC
1961) the request and everything after it travel wrapped: the handshake then hands on the
connection as a :class:`~trisocks.gss.stream.GssStream`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

from trisocks.protocol import (
    ALL_COMMANDS,
    AddressTypeNotSupported,
    AuthFailed,
    BadVersion,
    CommandNotSupported,
    Method,
    Reply,
    Request,
    SocksError,
    encode_auth_response,
    encode_method_selection,
    parse_auth_request,
    parse_greeting,
    parse_request,
)
from trisocks.server import quickio
from trisocks.server.context import ServerContext
from trisocks.server.control import ClientStream
from trisocks.server.gssapi import GssAuthFailed, accept_gssapi
from trisocks.server.logins import identify, password_login
from trisocks.server.replies import send_reply
from trisocks.sessions import Session

__all__ = ["HandshakeFailed", "handshake", "read_message"]

T = TypeVar("T")

_REASON = {
    CommandNotSupported: "command_not_supported",
    AddressTypeNotSupported: "address_type_not_supported",
}

METHOD_OF = {
    "none": Method.NO_AUTH,
    "password": Method.USERNAME_PASSWORD,
    "gssapi": Method.GSSAPI,
}


class HandshakeFailed(Exception):
    """The handshake ended without a request to serve; ``reason`` names why (for metrics)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


async def _read(
    stream: trio.abc.ReceiveStream,
    buf: bytearray,
    parse: Callable[[bytearray], tuple[T, int] | None],
) -> T:
    while True:
        parsed = parse(buf)
        if parsed is not None:
            message, used = parsed
            del buf[:used]
            return message
        data = await quickio.receive(stream, 4096)
        if not data:
            raise HandshakeFailed("eof", "client closed during the handshake")
        buf += data


read_message = _read
"""Read one message with an incremental parser (SOCKS4's request, too)."""


def _parse_request(buf: bytearray) -> tuple[Request, int] | None:
    return parse_request(buf, ALL_COMMANDS)  # Tor's RESOLVE and RESOLVE_PTR too


async def handshake(
    stream: trio.SocketStream, session: Session, ctx: ServerContext
) -> tuple[Request, bytes, ClientStream]:
    """Run the handshake; return the request, any bytes the client sent after it, and the
    stream to go on with (*stream* itself, or the GSSAPI-wrapped one).

    Raises HandshakeFailed after answering whatever the RFC says to answer."""
    buf = bytearray()
    try:
        greeting = await _read(stream, buf, parse_greeting)
    except BadVersion as exc:
        raise HandshakeFailed("bad_version", str(exc)) from None
    ctx.admission.progress()
    method = next(
        (METHOD_OF[m] for m in ctx.config.auth if METHOD_OF[m] in greeting.methods),
        Method.NO_ACCEPTABLE,
    )
    if session.user is not None and Method.NO_AUTH in greeting.methods:
        method = Method.NO_AUTH  # identified already (a TLS client certificate): no password
    await quickio.send(stream, encode_method_selection(method))
    if method == Method.NO_ACCEPTABLE:
        raise HandshakeFailed("no_acceptable_method", f"client offered {list(greeting.methods)}")
    if method == Method.USERNAME_PASSWORD:
        try:
            credentials = await _read(stream, buf, parse_auth_request)
            identity = await password_login(ctx, session, stream, credentials.username,
                                            credentials.password, "socks5")
        except AuthFailed as exc:
            await quickio.send(stream, encode_auth_response(False))
            raise HandshakeFailed("auth_failed", str(exc)) from None
        if identity is None:
            await quickio.send(stream, encode_auth_response(False))
            name = credentials.username.decode(errors="replace")
            raise HandshakeFailed("auth_failed", f"bad credentials for user {name!r}")
        identify(session, identity)
        await quickio.send(stream, encode_auth_response(True))
    client: ClientStream = stream
    if method == Method.GSSAPI:
        try:
            client = await accept_gssapi(stream, buf, session, ctx)
        except GssAuthFailed as exc:
            raise HandshakeFailed("auth_failed", f"gssapi: {exc}") from None
    try:
        request = await _read(client, buf, _parse_request)
    except SocksError as exc:
        await send_reply(client, session, exc.reply or Reply.GENERAL_FAILURE)
        raise HandshakeFailed(_REASON.get(type(exc), "malformed"), str(exc)) from None
    return request, bytes(buf), client
