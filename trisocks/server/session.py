"""One client connection from accept to close: handshake, then the command's handler.

Resource handling: the client stream is closed when this returns, whatever happened. Expected
failures (the client's bytes, the network) end only this session and are logged in its access
line; nothing escapes to the accept loop.
"""

from __future__ import annotations

import logging

import trio

from trisocks.protocol import Command
from trisocks.server.bind import handle_bind
from trisocks.server.common import format_sockaddr
from trisocks.server.connect import handle_connect
from trisocks.server.context import ServerContext
from trisocks.server.handshake import HandshakeFailed, handshake
from trisocks.server.udp import handle_udp_associate
from trisocks.sessions import COMMAND_NAMES, Session

__all__ = ["handle_client"]

log = logging.getLogger("trisocks.session")


async def handle_client(stream: trio.SocketStream, ctx: ServerContext) -> None:
    """Serve one accepted connection (the body of one nursery task)."""
    try:
        client = format_sockaddr(stream.socket.getpeername())
    except OSError:  # already reset by the peer
        await trio.aclose_forcefully(stream)
        return
    started = trio.current_time()
    with ctx.registry.track(client) as session:
        try:
            await _serve(stream, session, ctx)
        except HandshakeFailed as exc:
            ctx.stats.handshake_failures[exc.reason] += 1
            session.close_reason = str(exc)
        except trio.TooSlowError:
            ctx.stats.handshake_failures["timeout"] += 1
            session.close_reason = "handshake timeout"
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            session.close_reason = session.close_reason or f"client: {exc}"
        finally:
            await trio.aclose_forcefully(stream)
    if session.scope.cancelled_caught and session.close_reason is None:
        session.close_reason = "cancelled"
    _log_session(ctx, session, trio.current_time() - started)


async def _serve(stream: trio.SocketStream, session: Session, ctx: ServerContext) -> None:
    with trio.fail_after(ctx.config.handshake_timeout):
        request, leftover = await handshake(stream, session, ctx)
    session.command = COMMAND_NAMES[request.command]
    session.target = str(request.address)
    ctx.registry.notify("request", session)
    await HANDLERS[request.command](stream, session, request, leftover, ctx)


HANDLERS = {
    Command.CONNECT: handle_connect,
    Command.BIND: handle_bind,
    Command.UDP_ASSOCIATE: handle_udp_associate,
}


def _log_session(ctx: ServerContext, session: Session, duration: float) -> None:
    c = session.counters
    ctx.stats.bytes_up += c.bytes_up
    ctx.stats.bytes_down += c.bytes_down
    if session.reply is not None:
        ctx.stats.replies[session.reply] += 1
    ctx.access_log.info(
        "%s user=%s %s %s reply=%s up=%d down=%d duration=%.3fs%s",
        session.client,
        session.user or "-",
        session.command or "-",
        session.target or "-",
        f"{session.reply:02x}" if session.reply is not None else "-",
        c.bytes_up,
        c.bytes_down,
        duration,
        f" reason={session.close_reason!r}" if session.close_reason else "",
        extra={
            "session": {
                "id": session.id,
                "client": session.client,
                "user": session.user,
                "command": session.command,
                "target": session.target,
                "resolved": session.resolved,
                "reply": session.reply,
                "bytes_up": c.bytes_up,
                "bytes_down": c.bytes_down,
                "datagrams_up": c.datagrams_up,
                "datagrams_down": c.datagrams_down,
                "duration": round(duration, 6),
                "reason": session.close_reason,
            }
        },
    )
