"""One client connection from accept to close: handshake, then the command's handler.

Resource handling: the client stream is closed when this returns, whatever happened. Expected
failures (the client's bytes, the network) end only this session and are logged in its access
line; nothing escapes to the accept loop.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import trio

from trisocks.logs import quote
from trisocks.policy.rules import IP
from trisocks.protocol import Command, Reply
from trisocks.protocol.proxy import ProxyProtocolError
from trisocks.server.bind import handle_bind
from trisocks.server.common import format_sockaddr, ip_of, send_reply
from trisocks.server.connect import handle_connect
from trisocks.server.context import ServerContext
from trisocks.server.guard import HandshakeEvicted
from trisocks.server.handshake import HandshakeFailed, handshake
from trisocks.server.listeners import receive_proxy_header
from trisocks.server.udp import handle_udp_associate
from trisocks.sessions import COMMAND_NAMES, Session

__all__ = ["handle_client"]

log = logging.getLogger("trisocks.session")


async def handle_client(stream: trio.SocketStream, ctx: ServerContext) -> None:
    """Serve one accepted connection (the body of one nursery task).

    The client socket is closed with the trio socket's synchronous ``close`` (it wakes any
    task waiting on it): ``await stream.aclose()`` would add a checkpoint, a whole pass of the
    scheduler, to every connection."""
    try:
        peer = stream.socket.getpeername()
    except OSError:  # already reset by the peer
        stream.socket.close()
        return
    if ctx.config.proxy_protocol:
        peer = await _proxied_peer(stream, peer, ctx)
        if peer is None:
            stream.socket.close()
            return
    client, ip = format_sockaddr(peer), ip_of(peer[0])
    if ctx.guard.admit(ip) is not None:  # counted; not a session, so not in the access log
        stream.socket.close()
        return
    started = trio.current_time()
    with ctx.registry.track(client) as session:
        try:
            await _serve(stream, session, ctx, ip)
        except HandshakeFailed as exc:
            ctx.stats.handshake_failures[exc.reason] += 1
            if exc.reason == "auth_failed":
                ctx.guard.auth_result(ip, ok=False)
            session.close_reason = str(exc)
        except HandshakeEvicted as exc:  # counted under its cap in stats.limited as well
            ctx.stats.handshake_failures["evicted"] += 1
            session.close_reason = str(exc)
        except trio.TooSlowError:
            ctx.stats.handshake_failures["timeout"] += 1
            session.close_reason = "handshake timeout"
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            session.close_reason = session.close_reason or f"client: {exc}"
        except Exception as exc:  # a bug in one session must not stop the server
            log.exception("session %s: internal error", session.id)
            session.close_reason = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            if session.scope.cancel_called and session.close_reason is None:
                expired = trio.current_time() >= session.scope.deadline
                session.close_reason = "max session duration" if expired else "cancelled"
            _discard_unread(stream.socket)
            stream.socket.close()
    _log_session(ctx, session, trio.current_time() - started)


UNREAD_LIMIT = 256 * 1024


def _discard_unread(sock: trio.socket.SocketType) -> None:
    """Read away what the client sent and nobody read (say, payload pipelined behind a request
    that got a failure reply), up to :data:`UNREAD_LIMIT`: closing a socket with unread input
    makes the kernel send a reset, and a reset may reach the client before it has read our
    last reply (Linux clients keep it; others may not). One non-blocking call when nothing is
    pending (trio's sockets are non-blocking)."""
    left = UNREAD_LIMIT
    try:
        while left > 0 and (chunk := os.read(sock.fileno(), min(left, 65536))):
            left -= len(chunk)
    except OSError:  # nothing pending (EAGAIN), or the connection is gone already
        pass


async def _proxied_peer(stream: trio.SocketStream, balancer: Any, ctx: ServerContext) -> Any:
    """The real client's address from the PROXY protocol header (the balancer's own for a
    LOCAL health check); ``None`` when the header is missing or invalid. Such a connection is
    no session (its client is unknown): it is counted and logged, not put in the access log.
    """
    try:
        with trio.fail_after(ctx.config.handshake_timeout):
            return (await receive_proxy_header(stream)).source or balancer
    except (ProxyProtocolError, EOFError, OSError, trio.TooSlowError) as exc:
        ctx.stats.handshake_failures["proxy_header"] += 1
        log.info("connection from %s refused: PROXY protocol header: %s",
                 format_sockaddr(balancer), exc or "timed out")
        return None


async def _serve(stream: trio.SocketStream, session: Session, ctx: ServerContext, ip: IP) -> None:
    with ctx.guard.handshaking(session, ip):  # the handshake timeout, and eviction
        request, leftover, client = await handshake(stream, session, ctx)
    if session.user is not None:
        ctx.guard.auth_result(ip, ok=True)
    session.command = COMMAND_NAMES[request.command]
    session.target = str(request.address)
    ctx.registry.notify("request", session)
    _, refusal = ctx.guard.open_request(session, ip, request)
    if refusal is not None:  # RFC 1928 §6: "connection not allowed by ruleset"
        log.info("session %s: %s %s refused: %s", session.id, session.command,
                 quote(session.target), refusal)
        session.close_reason = refusal
        await send_reply(client, session, Reply.NOT_ALLOWED)
        return
    lifetime = ctx.guard.max_duration(session)
    if lifetime:  # the session's own scope carries it: no extra scope per session
        session.scope.deadline = trio.current_time() + lifetime
    await HANDLERS[request.command](client, session, request, leftover, ctx)


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
        "%s user=%s %s %s reply=%s rule=%s up=%d down=%d duration=%.3fs%s",
        quote(session.client),  # every value a client (or an operator) chose is quoted
        quote(session.user),
        quote(session.command),
        quote(session.target),
        f"{session.reply:02x}" if session.reply is not None else "-",
        quote(session.rule),
        c.bytes_up,
        c.bytes_down,
        duration,
        f" reason={quote(session.close_reason)}" if session.close_reason else "",
        extra={
            "session": {
                "id": session.id,
                "client": session.client,
                "user": session.user,
                "command": session.command,
                "target": session.target,
                "resolved": session.resolved,
                "reply": session.reply,
                "rule": session.rule,
                "bytes_up": c.bytes_up,
                "bytes_down": c.bytes_down,
                "datagrams_up": c.datagrams_up,
                "datagrams_down": c.datagrams_down,
                "duration": round(duration, 6),
                "reason": session.close_reason,
            }
        },
    )
