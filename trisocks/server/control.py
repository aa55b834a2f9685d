"""The client's control connection as the command handlers see it: its stream type, a socket
opened beside it (BIND, UDP ASSOCIATE), the address announced for one, and watching it close."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from trisocks.gss.stream import GssStream
from trisocks.net import address_of, socket_of
from trisocks.protocol import Address

if TYPE_CHECKING:
    from trisocks.server.context import ServerContext

__all__ = [
    "CONTROL_BUFFER_LIMIT",
    "ClientStream",
    "announced_address",
    "open_local_socket",
    "unless_closed",
    "watch_control",
]

T = TypeVar("T")

CONTROL_BUFFER_LIMIT = 64 * 1024
"""Bytes :func:`watch_control` keeps for later; beyond it, TCP flow control holds the rest."""

ClientStream = trio.SocketStream | GssStream | trio.SSLStream[trio.SocketStream]
"""The client connection as handlers see it: plain, wrapped after GSSAPI (RFC 1961), or inside
TLS (a TLS listener). :func:`socket_of` gives the socket under any of them, for addresses;
only a plain one can be relayed by file descriptor."""


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


async def unless_closed(
    stream: ClientStream, keep: bytearray, limit: float, wait: Callable[[], Awaitable[T]]
) -> T | None:
    """``await wait()`` within *limit* seconds while watching the control connection (BIND's rule 3:
    the client may give up): its result, or ``None`` if the client closed first. What the
    client sends meanwhile is kept in *keep* (:func:`watch_control`).

    Raises:
        trio.TooSlowError: *wait* took longer than *limit*.
        Exception: what *wait* raised, as it is (not wrapped in an exception group).
    """
    result: T | None = None
    failure: Exception | None = None
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            await watch_control(stream, keep)
            nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        try:
            with trio.fail_after(limit):
                result = await wait()
        except Exception as exc:  # raised from here, out of the nursery: not in a group
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
    return result
