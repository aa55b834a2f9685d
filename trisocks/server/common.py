"""Small helpers the command handlers share."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from trisocks.gss.stream import GssStream, relay_gss
from trisocks.net import address_of, socket_of
from trisocks.protocol import Address, Reply, encode_reply
from trisocks.protocol.socks4 import encode_socks4_reply
from trisocks.server import quickio
from trisocks.server.relay import relay
from trisocks.sessions import Session

if TYPE_CHECKING:
    from trisocks.server.context import ServerContext

__all__ = [
    "CONTROL_BUFFER_LIMIT",
    "REPLY_ENCODERS",
    "ClientStream",
    "announced_address",
    "open_local_socket",
    "relay_session",
    "send_reply",
    "watch_control",
]

CONTROL_BUFFER_LIMIT = 64 * 1024
"""Bytes :func:`watch_control` keeps for later; beyond it, TCP flow control holds the rest."""

ClientStream = trio.SocketStream | GssStream | trio.SSLStream[trio.SocketStream]
"""The client connection as handlers see it: plain, wrapped after GSSAPI (RFC 1961), or inside
TLS (a TLS listener). :func:`socket_of` gives the socket under any of them, for addresses;
only a plain one can be relayed by file descriptor."""


def _socks4_reply(reply: Reply, bound: Address | None) -> bytes:
    return encode_socks4_reply(reply == Reply.SUCCEEDED, bound)


REPLY_ENCODERS: dict[str, Callable[[Reply, Address | None], bytes]] = {
    "socks5": encode_reply,
    "socks4": _socks4_reply,
}
"""How a reply goes on the wire, by :attr:`Session.protocol`: the handlers (CONNECT, BIND,
RESOLVE) are shared and speak in RFC 1928 codes; SOCKS4 turns success into 5A and every
failure into 5B."""


async def send_reply(
    stream: ClientStream, session: Session, reply: Reply, bound: Address | None = None
) -> None:
    """Send a reply in the session's protocol and remember it as the session's outcome (as
    an RFC 1928 code, whatever the protocol: it says more than SOCKS4's 5B)."""
    session.reply = reply
    await quickio.send(stream, REPLY_ENCODERS[session.protocol](reply, bound))


async def open_local_socket(stream: ClientStream, type: int) -> trio.socket.SocketType:
    """A socket of *type* bound to the control connection's local address, port 0.

    BIND and UDP ASSOCIATE open theirs there, so the client (and its peer) can reach it the way
    the client reached us: same interface, same family (an IPv6 tuple keeps its scope id).

    Raises:
        OSError: the socket cannot be created or bound.
    """
    sockname = socket_of(stream).getsockname()
    sock = trio.socket.socket(socket_of(stream).family, type)
    try:
        await sock.bind((sockname[0], 0, *sockname[2:]))
    except BaseException:
        sock.close()
        raise
    return sock


def announced_address(ctx: ServerContext, sockaddr: Any) -> Address:
    """What a BIND or UDP reply names: *sockaddr*, or ``external_address`` with its port when
    the server sits behind NAT and its local address means nothing to the client."""
    if ctx.config.external_address is not None:
        return Address.of(ctx.config.external_address, sockaddr[1])
    return address_of(sockaddr)


async def watch_control(stream: ClientStream, keep: bytearray | None = None) -> None:
    """Return once the client has closed the control connection (EOF or a socket error).

    Bytes the client sends meanwhile are appended to *keep* (up to
    :data:`CONTROL_BUFFER_LIMIT`; then reading stops and this waits to be cancelled), or
    discarded when *keep* is None (UDP ASSOCIATE: nothing is meant to follow the request)."""
    try:
        while keep is None or len(keep) < CONTROL_BUFFER_LIMIT:
            room = CONTROL_BUFFER_LIMIT - len(keep) if keep is not None else CONTROL_BUFFER_LIMIT
            data = await stream.receive_some(room)
            if not data:
                return
            if keep is not None:
                keep += data
    except (OSError, trio.BrokenResourceError):
        return
    await trio.sleep_forever()


async def relay_session(
    stream: ClientStream,
    upstream: trio.SocketStream,
    leftover: bytes,
    session: Session,
    ctx: ServerContext,
) -> None:
    """The relaying phase of CONNECT and BIND: what the client sent early goes first, then
    both directions flow until they end; how they ended (:func:`relay`: a normal end, the idle
    timeout, or a socket error and its side) becomes the close reason."""
    ctx.registry.set_state(session, "relaying")
    if leftover:
        await upstream.send_all(leftover)
        session.counters.bytes_up += len(leftover)
    throttles = ctx.guard.throttles(session)
    if isinstance(stream, GssStream):  # wrapped bytes: no splice, no fd copy
        failure = await relay_gss(
            stream, upstream, session.counters, ctx.config.idle_timeout, throttles
        )
        if failure is not None:
            session.close_reason = f"relay: {failure.strerror or failure}"
    else:
        session.close_reason = await relay(
            stream, upstream, session.counters, ctx.engine, ctx.config.idle_timeout, throttles
        )
