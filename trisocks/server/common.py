"""Small helpers the command handlers share."""

from __future__ import annotations

import socket
from typing import Any

import trio

from trisocks.protocol import Address, Reply, encode_reply
from trisocks.sessions import Session

__all__ = ["address_of", "format_sockaddr", "send_reply"]


def address_of(sockaddr: Any) -> Address:
    """A socket address tuple (IPv4 or IPv6) as a protocol Address."""
    return Address.of(sockaddr[0].split("%")[0], sockaddr[1])


def format_sockaddr(sockaddr: Any) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def send_reply(
    stream: trio.SocketStream, session: Session, reply: Reply, bound: Address | None = None
) -> None:
    """Send a reply and remember it as the session's outcome."""
    session.reply = reply
    await stream.send_all(encode_reply(reply, bound))


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET
