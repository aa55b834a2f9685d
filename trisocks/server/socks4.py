"""The server's side of a SOCKS4/4a request (the connection's first byte was ``04``).

SOCKS4 has one message each way before the relay: the request (with USERID, and for SOCKS4a a
domain name) and a reply. What follows the request is the same as for SOCKS5: the request is
turned into a :class:`trisocks.protocol.Request` (same command, same address) and served by
the same path (:func:`trisocks.server.session.serve_request`: rules, limits, CONNECT's dialer,
BIND, Tor's RESOLVE, relay, accounting, kill); only the replies are encoded the SOCKS4 way
(:data:`trisocks.server.replies.REPLY_ENCODERS`).

USERID is logged (``userid=`` in the access line), never trusted: SOCKS4 has no password, so
where the server requires authentication (``none`` not in ``auth``) every SOCKS4 request is
refused with 5B, unless the session is identified already (a TLS client certificate).
"""

from __future__ import annotations

import trio

from trisocks.protocol import Reply, Request
from trisocks.protocol.socks4 import Socks4Error, parse_socks4_request
from trisocks.server.context import ServerContext
from trisocks.server.handshake import HandshakeFailed, read_message
from trisocks.server.replies import send_reply
from trisocks.sessions import Session

__all__ = ["socks4_handshake"]


async def socks4_handshake(
    stream: trio.abc.Stream, session: Session, ctx: ServerContext
) -> tuple[Request, bytes]:
    """Read the request; return it (as a SOCKS5 Request) and what the client sent after it.

    Raises:
        HandshakeFailed: after answering 5B (a malformed request, or authentication required).
    """
    session.protocol = "socks4"
    buf = bytearray()
    try:
        request = await read_message(stream, buf, parse_socks4_request)
    except Socks4Error as exc:
        await send_reply(stream, session, Reply.GENERAL_FAILURE)
        raise HandshakeFailed("malformed", f"socks4: {exc}") from None
    session.userid = request.userid.decode("utf-8", "backslashreplace")
    if session.user is None and "none" not in ctx.config.auth:
        await send_reply(stream, session, Reply.NOT_ALLOWED)
        raise HandshakeFailed("auth_required", "socks4 has no password; auth requires one")
    return Request(request.command, request.address), bytes(buf)
