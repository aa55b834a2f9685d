"""BIND (RFC 1928 §4): listen, announce, accept the expected peer, announce it, relay.

Rules this module keeps:

1. The listening socket lives on the control connection's local address (the client reached
   us there, so its peer can too) and is closed as soon as one peer is accepted. While it is
   open it counts against the user's ``max_binds_per_user`` (``Reservations.reserve``).
2. When DST.ADDR is not all zeros, only a peer whose IP is DST.ADDR (any address of it, for a
   domain) is accepted; any other connection is closed at once and the wait goes on. DST.PORT
   is not checked: a peer's source port is usually ephemeral.
3. The wait ends at the first of: an accepted peer, ``bind_timeout`` (second reply REP 06), an
   accept error (second reply by :func:`reply_for`), or the client closing the control
   connection (no second reply: nobody is left to read it). Bytes the client sends while it
   waits are kept and delivered to the peer first.
4. Every socket is owned by a ``with`` block from the moment it exists, so a session killed at
   any checkpoint closes all of them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket

import trio

from trisocks.net import address_of, ip_of, peer_address
from trisocks.policy.addresses import canonical
from trisocks.protocol import Address, AddressType, Reply, Request
from trisocks.server.context import ServerContext
from trisocks.server.control import (
    ClientStream,
    announced_address,
    open_local_socket,
    unless_closed,
)
from trisocks.server.dial import literal, lookup
from trisocks.server.errors import reply_for
from trisocks.server.relay import relay_session
from trisocks.server.replies import send_reply
from trisocks.sessions import Session

__all__ = ["handle_bind"]

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


async def handle_bind(
    stream: ClientStream,
    session: Session,
    request: Request,
    leftover: bytes,
    ctx: ServerContext,
) -> None:
    """Serve a BIND request: two replies, then relay between the client and its peer."""
    refusal = ctx.reservations.reserve(session, "bind")  # while the listener is (or the session)
    if refusal is not None:
        await send_reply(stream, session, refusal)
        return
    ctx.registry.set_state(session, "connecting")
    try:
        expected = await _expected_peer_ips(request.address)
        listener = await open_local_socket(stream, socket.SOCK_STREAM)
    except OSError as exc:
        session.close_reason = f"bind failed: {exc}"
        await send_reply(stream, session, reply_for(exc))
        return
    denial = ctx.judge.deny_resolved(session, list(expected)) if expected else None
    if denial is not None:  # a domain DST.ADDR: its addresses are judged here
        listener.close()
        session.close_reason = f"denied by rule {denial.rule_id}"
        await send_reply(stream, session, Reply.NOT_ALLOWED)
        return
    early = bytearray(leftover)
    with contextlib.ExitStack() as owned:
        with listener:
            listener.listen(1)
            await send_reply(
                stream, session, Reply.SUCCEEDED, announced_address(ctx, listener.getsockname())
            )
            try:
                peer = await _wait_for_peer(stream, listener, expected, early, owned, ctx)
            except (OSError, trio.TooSlowError) as exc:
                session.close_reason = f"no peer: {exc}" if str(exc) else "bind timeout"
                await send_reply(stream, session, reply_for(exc))
                return
        ctx.reservations.release(session)  # the listener is closed: now it is a relay like CONNECT
        if peer is None:
            session.close_reason = "client closed the control connection while waiting"
            return
        peername = peer.socket.getpeername()
        session.resolved = peer_address(peername)
        await send_reply(stream, session, Reply.SUCCEEDED, address_of(peername))
        await relay_session(stream, peer, bytes(early), session, ctx)


async def _expected_peer_ips(address: Address) -> frozenset[IP] | None:
    """The IPs a peer may come from; ``None`` (anyone) when DST.ADDR is all zeros.

    Raises:
        OSError: a domain DST.ADDR does not resolve (``socket.gaierror``).
    """
    address = literal(address)  # a numeric name is its address
    if address.atyp != AddressType.DOMAIN:
        return None if address.is_unspecified else frozenset({canonical(ip_of(address.host))})
    infos = await lookup(address.host, None, socket.SOCK_STREAM)
    return frozenset(canonical(ip_of(str(info[4][0]))) for info in infos)


async def _wait_for_peer(
    stream: ClientStream,
    listener: trio.socket.SocketType,
    expected: frozenset[IP] | None,
    early: bytearray,
    owned: contextlib.ExitStack,
    ctx: ServerContext,
) -> trio.SocketStream | None:
    """Wait for the expected peer while watching the control connection (rule 3).

    Returns:
        The peer's stream (already owned by *owned*), or ``None`` if the client closed the
        control connection first.
    Raises:
        trio.TooSlowError: no acceptable peer within ``bind_timeout``.
        OSError: ``accept`` failed.
    """
    return await unless_closed(stream, early, ctx.config.bind_timeout,
                               lambda: _accept_expected(listener, expected, owned))


async def _accept_expected(
    listener: trio.socket.SocketType, expected: frozenset[IP] | None, owned: contextlib.ExitStack
) -> trio.SocketStream:
    """Accept until a connection comes from an expected IP (rule 2); close the others."""
    while True:
        sock, sockaddr = await listener.accept()
        # No checkpoint between accept and here: the socket is always owned by someone.
        if expected is None or ip_of(sockaddr[0]) in expected:
            owned.enter_context(sock)
            return trio.SocketStream(sock)
        sock.close()
