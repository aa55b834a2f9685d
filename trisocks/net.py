"""Socket addresses: parsed, formatted and compared the same way everywhere."""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

import trio

from trisocks.protocol import Address

__all__ = ["IP", "address_of", "format_sockaddr", "ip_of", "parse_hostport", "peer_address",
           "socket_of"]

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def socket_of(stream: object) -> trio.socket.SocketType:
    """The socket under a client stream: its own, or its transport's (``transport_stream`` of
    a :class:`trio.SSLStream`, and so on down through wrappers)."""
    for _ in range(8):  # wrappers do not nest deeper than a few levels
        sock = getattr(stream, "socket", None)
        if sock is not None:
            return sock  # type: ignore[no-any-return]
        stream = getattr(stream, "transport_stream", None) or getattr(stream, "stream", None)
    raise TypeError("not a stream over a socket")


def address_of(sockaddr: Any) -> Address:
    """A socket address tuple (IPv4 or IPv6) as a protocol Address."""
    return Address.of(sockaddr[0].split("%")[0], sockaddr[1])


def format_sockaddr(sockaddr: Any) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@functools.lru_cache(maxsize=4096)
def ip_of(host: str) -> IP:
    """An IP literal, comparable across families: the zone is cut off and an IPv4-mapped IPv6
    address (a dual-stack socket's view of an IPv4 peer) becomes IPv4.

    Cached: the same clients and targets come back again and again, and parsing an address
    costs more than the rest of a rule check."""
    ip = ipaddress.ip_address(host.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_hostport(text: str) -> Address:
    """``host:port`` or ``[v6]:port`` (as :func:`format_sockaddr` and ``str(Address)`` write
    them) back as an Address.

    Raises:
        ValueError: no ``:port``, or the port is not a number.
    """
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError(f"{text!r} is not host:port")
    return Address.of(host.removeprefix("[").removesuffix("]"), int(port))


def peer_address(sockaddr: Any) -> Address:
    """A socket address tuple as the session record keeps it: an IPv6 zone stays (unlike
    :func:`address_of`, which gives what a reply can carry)."""
    return Address.of(sockaddr[0], sockaddr[1])
