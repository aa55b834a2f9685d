"""CONNECT (RFC 1928 §4): open the outbound connection (to addresses the rules saw), reply,
relay."""

from __future__ import annotations

import trio

from trisocks.net import address_of, peer_address
from trisocks.protocol import Address, Reply, Request
from trisocks.server.context import ServerContext
from trisocks.server.control import ClientStream
from trisocks.server.dial import Denied, dial
from trisocks.server.errors import reply_for
from trisocks.server.relay import relay_session
from trisocks.server.replies import send_reply
from trisocks.sessions import Session

__all__ = ["dial_target", "handle_connect"]

HAPPY_EYEBALLS_DELAY = 0.25


async def dial_target(session: Session, ctx: ServerContext, target: Address) -> trio.SocketStream:
    """Connect *session* to *target*, judging every address a name resolves to, within the
    connect timeout (SOCKS and HTTP CONNECT, and HTTP forwarding, alike).

    Raises:
        Denied: a resolved address is denied by the rules.
        OSError: refused, unreachable, no such name.
        trio.TooSlowError: the connect timeout passed.
    """
    ctx.registry.set_state(session, "connecting")
    with trio.fail_after(ctx.config.connect_timeout):
        return await dial(
            target, lambda ips: ctx.judge.deny_resolved(session, ips), HAPPY_EYEBALLS_DELAY
        )


async def handle_connect(
    stream: ClientStream,
    session: Session,
    request: Request,
    leftover: bytes,
    ctx: ServerContext,
) -> None:
    try:
        upstream = await dial_target(session, ctx, request.address)
    except Denied as exc:
        session.close_reason = str(exc)
        await send_reply(stream, session, Reply.NOT_ALLOWED)
        return
    except (OSError, trio.TooSlowError) as exc:
        session.close_reason = f"connect failed: {exc}"
        await send_reply(stream, session, reply_for(exc))
        return
    try:
        session.resolved = peer_address(upstream.socket.getpeername())
        await send_reply(
            stream, session, Reply.SUCCEEDED, address_of(upstream.socket.getsockname())
        )
        await relay_session(stream, upstream, leftover, session, ctx)
    finally:
        upstream.socket.close()  # synchronous: an async close would cost a checkpoint
