"""Listening sockets (shared between worker processes) and the PROXY protocol header.

``--workers N`` runs N processes that each bind the same ports with ``SO_REUSEPORT``: the
kernel spreads new connections over the N accept queues, so no process wakes for a
connection another one takes (a pre-forked shared socket would wake them all).
"""

from __future__ import annotations

import errno
import socket

import trio

from trisocks.config import Endpoint
from trisocks.protocol.proxy import MAX_HEADER, ProxyHeader, parse_proxy_header

__all__ = ["open_listeners", "receive_proxy_header"]

BACKLOG = 0xFFFF
"""As trio's own listeners: the kernel caps it at ``net.core.somaxconn``."""


async def open_listeners(endpoint: Endpoint, *, reuse_port: bool) -> list[trio.SocketListener]:
    """Listen on every address *endpoint* resolves to, as :func:`trio.open_tcp_listeners`
    does, with ``SO_REUSEPORT`` when *reuse_port*.

    Raises:
        OSError: an address cannot be bound (already in use without ``SO_REUSEPORT`` on both
            sides, permission, ...).
    """
    if not reuse_port:
        return await trio.open_tcp_listeners(endpoint.port, host=endpoint.host)
    infos = await trio.socket.getaddrinfo(
        endpoint.host, endpoint.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    listeners = []
    try:
        for family, kind, proto, _, sockaddr in infos:
            sock = trio.socket.socket(family, kind, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                await sock.bind(sockaddr)
                sock.listen(BACKLOG)
            except OSError:
                sock.close()
                raise
            listeners.append(trio.SocketListener(sock))
    except OSError:
        for listener in listeners:
            listener.socket.close()
        raise
    return listeners


async def receive_proxy_header(stream: trio.SocketStream) -> ProxyHeader:
    """Read the PROXY protocol header at the start of *stream*, and not one byte more.

    The SOCKS greeting may sit right behind the header in the same segment, and the handshake
    reads from the socket itself (the relay may even splice it), so nothing may be left in a
    buffer of ours. Peeking makes that exact: while a header is incomplete, every byte seen
    belongs to it and can be consumed; once complete, exactly its length is consumed.

    Raises:
        ProxyProtocolError: not a valid header (rule 2 of :mod:`trisocks.protocol.proxy`).
        EOFError: the peer closed before the header was complete.
        OSError: the connection failed.
    """
    sock = stream.socket
    seen = bytearray()
    while True:
        peeked = await sock.recv(MAX_HEADER - len(seen), socket.MSG_PEEK)
        if not peeked:
            raise EOFError("connection closed inside the PROXY protocol header")
        parsed = parse_proxy_header(seen + peeked)
        consume = len(peeked) if parsed is None else parsed[1] - len(seen)
        while consume:  # the bytes are queued already: these recvs return at once
            got = await sock.recv(consume)
            if not got:
                raise OSError(errno.ECONNRESET, "connection lost inside the PROXY header")
            seen += got
            consume -= len(got)
        if parsed is not None:
            return parsed[0]
