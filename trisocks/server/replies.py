"""Replies go on the wire here, one encoder per protocol: the handlers (CONNECT, BIND, UDP,
RESOLVE) are shared by SOCKS5 and SOCKS4 and speak in RFC 1928 codes. (The HTTP proxy answers
with statuses: :mod:`trisocks.server.http_messages`.)"""

from __future__ import annotations

from collections.abc import Callable

import trio

from trisocks.protocol import Address, Reply, encode_reply
from trisocks.protocol.socks4 import encode_socks4_reply
from trisocks.server import quickio
from trisocks.sessions import Session

__all__ = ["REPLY_ENCODERS", "send_reply"]


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
    stream: trio.abc.SendStream, session: Session, reply: Reply, bound: Address | None = None
) -> None:
    """Send a reply in the session's protocol and remember it as the session's outcome (as
    an RFC 1928 code, whatever the protocol: it says more than SOCKS4's 5B)."""
    session.reply = reply
    await quickio.send(stream, REPLY_ENCODERS[session.protocol](reply, bound))
