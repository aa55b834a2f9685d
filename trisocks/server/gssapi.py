"""The server's side of METHOD 01 (RFC 1961 §3-§4): establish the context, agree on the
protection level, and hand back the connection as a :class:`GssStream`.

Rules:

1. Context tokens are MTYP 1 frames; the server answers each with the acceptor's output token
   (when there is one) until its context is complete. Acceptor steps may block (keytab,
   replay cache) and run in a worker thread.
2. The client then sends its level (MTYP 2); the answer is :func:`choose_level` over the
   configured levels the context can give (§4.1), wrapped without confidentiality (§4.4).
3. Any failure sends ``01 FF`` (§3.8) unless the client aborted, and raises
   :class:`GssAuthFailed`; the session then closes.
4. The principal becomes the session's user: ``alice`` for ``alice@<default realm>``, the whole
   principal for any other realm (two realms may both have an alice).
"""

from __future__ import annotations

import trio

from trisocks.gss.stream import FrameChannel, GssFailure, GssStream, send_abort
from trisocks.identity.model import Identity
from trisocks.protocol.errors import SocksError
from trisocks.protocol.gssapi import (
    GssAborted,
    MessageType,
    ProtectionLevel,
    choose_level,
    encode_protection_level,
    parse_protection_level,
)
from trisocks.server.context import ServerContext
from trisocks.server.logins import identify
from trisocks.sessions import Session

__all__ = ["GssAuthFailed", "accept_gssapi", "user_of"]


class GssAuthFailed(Exception):
    """The GSS-API exchange failed; the abort has been sent."""


def user_of(principal: str, default_realm: str) -> str:
    """Rule 4. The realm is after the last ``@`` (an escaped ``\\@`` can only come before)."""
    name, at, realm = principal.rpartition("@")
    return name if at and realm == default_realm else principal


async def accept_gssapi(
    stream: trio.SocketStream, received: bytearray, session: Session, ctx: ServerContext
) -> GssStream:
    """Run the RFC 1961 exchange on a connection whose client was just sent METHOD 01.

    Args:
        received: bytes already read past the greeting (a client may send its first token
            right behind it); consumed.
    Returns:
        The connection as a stream of plain bytes, with ``session.user`` set.
    Raises:
        GssAuthFailed: after the abort (rule 3).
    """
    from trisocks.gss import mech  # the optional extra; config checks it is installed

    channel = FrameChannel(stream, received)
    received.clear()
    config = ctx.config
    try:
        acceptor = await trio.to_thread.run_sync(mech.Acceptor, config.gss_service,
                                                  config.gss_keytab)
        while not acceptor.complete:
            token = await channel.expect(MessageType.CONTEXT)
            reply = await trio.to_thread.run_sync(acceptor.step, token)
            if reply is not None:
                await channel.send(MessageType.CONTEXT, reply)
        requested = parse_protection_level(
            acceptor.unwrap_level(await channel.expect(MessageType.PROTECTION))
        )
        offered = acceptor.available_levels() & set(map(ProtectionLevel, config.gss_level))
        if not offered:
            raise GssFailure("the context cannot give any accepted protection level")
        level = choose_level(requested, offered)
        await channel.send(
            MessageType.PROTECTION, acceptor.wrap_level(encode_protection_level(level))
        )
        user = user_of(acceptor.initiator, await trio.to_thread.run_sync(mech.default_realm))
    except (SocksError, GssFailure) as exc:
        if not isinstance(exc, GssAborted):
            await send_abort(stream)
        raise GssAuthFailed(str(exc)) from None
    identify(session, Identity("gssapi", user))
    return GssStream(stream, acceptor.protection(level), bytes(channel.buffer))
