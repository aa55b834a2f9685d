"""CONNECT (RFC 1928 §4): open the outbound connection (to addresses the rules saw), reply,
relay."""

from __future__ import annotations

import trio

from trisocks.protocol import Reply, Request
from trisocks.server.common import (
    ClientStream,
    address_of,
    format_sockaddr,
    relay_session,
    send_reply,
)
from trisocks.server.context import ServerContext
from trisocks.server.dial import Denied, dial
from trisocks.server.errors import reply_for
from trisocks.sessions import Session

__all__ = ["handle_connect"]

HAPPY_EYEBALLS_DELAY = 0.25


async def handle_connect(
    stream: ClientStream,
    session: Session,
    request: Request,
    leftover: bytes,
    ctx: ServerContext,
) -> None:
    target = request.address
    ctx.registry.set_state(session, "connecting")
    try:
        with trio.fail_after(ctx.config.connect_timeout):
            upstream = await dial(
                target, lambda ips: ctx.guard.deny_resolved(session, ips), HAPPY_EYEBALLS_DELAY
            )
    except Denied as exc:
        session.close_reason = str(exc)
        await send_reply(stream, session, Reply.NOT_ALLOWED)
        return
    except (OSError, trio.TooSlowError) as exc:
        session.close_reason = f"connect failed: {exc}"
        await send_reply(stream, session, reply_for(exc))
        return
    try:
        session.resolved = format_sockaddr(upstream.socket.getpeername())
        await send_reply(
            stream, session, Reply.SUCCEEDED, address_of(upstream.socket.getsockname())
        )
        await relay_session(stream, upstream, leftover, session, ctx)
    finally:
        upstream.socket.close()  # synchronous: an async close would cost a checkpoint
