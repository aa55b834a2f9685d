"""Socket addresses: parsed, formatted and compared the same way everywhere."""

from __future__ import annotations

import functools
import ipaddress
from typing import Any

import trio

from trisocks.protocol import Address

__all__ = ["address_of", "format_sockaddr", "ip_of", "socket_of"]


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
def ip_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """An IP literal, comparable across families: the zone is cut off and an IPv4-mapped IPv6
    address (a dual-stack socket's view of an IPv4 peer) becomes IPv4.

    Cached: the same clients and targets come back again and again, and parsing an address
    costs more than the rest of a rule check."""
    ip = ipaddress.ip_address(host.split("%")[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip
