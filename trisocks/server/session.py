"""One client connection from accept to close: handshake, then the command's handler.

Resource handling: the client stream is closed when this returns, whatever happened. Expected
failures (the client's bytes, the network) end only this session and are logged in its access
line; nothing escapes to the accept loop.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any, cast

import trio

from trisocks.identity.model import Identity
from trisocks.logs import quote
from trisocks.net import format_sockaddr, ip_of
from trisocks.policy.rules import IP
from trisocks.protocol import Address, Command, Reply, Request
from trisocks.protocol.proxy import ProxyProtocolError
from trisocks.server.admission import HandshakeEvicted
from trisocks.server.connect import handle_connect
from trisocks.server.context import ServerContext
from trisocks.server.control import ClientStream
from trisocks.server.detect import detect
from trisocks.server.handshake import HandshakeFailed, handshake
from trisocks.server.judge import open_request
from trisocks.server.listeners import receive_proxy_header
from trisocks.server.logins import identify
from trisocks.server.parent_commands import handle_bind_routed, handle_udp_routed
from trisocks.server.replies import send_reply
from trisocks.server.resolve import handle_resolve
from trisocks.server.socks4 import socks4_handshake
from trisocks.sessions import COMMAND_NAMES, Session, SessionView
from trisocks.tls import certificate_user

__all__ = ["handle_client"]

log = logging.getLogger("trisocks.session")


async def handle_client(stream: trio.SocketStream, ctx: ServerContext, tls: bool = False) -> None:
    """Serve one accepted connection (the body of one nursery task); *tls*: it came to a TLS
    listener, so the session runs inside TLS (:func:`_start_tls`).

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
    client, ip = Address.of(peer[0], peer[1]), ip_of(peer[0])
    if ctx.admission.admit(ip) is not None:  # counted; not a session, so not in the access log
        stream.socket.close()
        return
    started = trio.current_time()
    with ctx.registry.track(client) as session:
        conn: trio.abc.Stream = stream  # the SSLStream on a TLS listener
        try:
            if tls:
                conn = await _start_tls(stream, session, ctx, ip)
            await _serve(conn, session, ctx, ip)  # type: ignore[arg-type]
        except HandshakeFailed as exc:
            ctx.stats.handshake_failures[exc.reason] += 1
            if exc.reason == "auth_failed":
                ctx.admission.auth_result(ip, ok=False)
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
            try:
                if conn is not stream:
                    await _close_tls(conn)
            finally:
                stream.socket.close()
    _log_session(ctx, session, trio.current_time() - started)


TLS_HANDSHAKE_RECORD = b"\x16"
"""The first byte of every TLS connection (a handshake record: the ClientHello)."""
TLS_CLOSE_GRACE = 1.0
"""Seconds the TLS close_notify may take to go out before the socket is closed anyway."""


async def _start_tls(
    stream: trio.SocketStream, session: Session, ctx: ServerContext, ip: IP
) -> trio.SSLStream[trio.SocketStream]:
    """The TLS handshake of a TLS listener's connection, under the handshake timeout and caps
    (:meth:`Admission.handshaking`), with the context current now (a reload changes only later
    handshakes). A verified client certificate names the session's user (:mod:`trisocks.tls`).

    Raises:
        HandshakeFailed: reason ``tls``: no TLS (a plain client), or the handshake failed
            (a client certificate missing or not verified when ``tls_client_ca`` is set).
    """
    assert ctx.tls_context is not None, "a TLS listener without a context: config unchecked"
    conn = trio.SSLStream(stream, ctx.tls_context, server_side=True)
    with ctx.admission.handshaking(session, ip):
        first = await stream.socket.recv(1, socket.MSG_PEEK)  # left in place for TLS to read
        if first != TLS_HANDSHAKE_RECORD:  # a plain client waiting for an answer: no TLS
            raise HandshakeFailed("tls", "not TLS (a plain client on a TLS listener)"
                                  if first else "client closed before TLS")
        try:
            await conn.do_handshake()
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            detail = getattr(cause, "reason", None) or str(cause or exc) or "connection lost"
            raise HandshakeFailed("tls", str(detail)) from None
    session.tls = True
    if ctx.config.tls_client_ca is not None:
        user = certificate_user(conn.getpeercert())
        if user is None:
            raise HandshakeFailed("tls", "the client certificate names no CN")
        identify(session, Identity("tls", user))  # no password: the handshake offers 00
    return conn


async def _close_tls(conn: trio.abc.Stream) -> None:
    """Send close_notify, best effort: within :data:`TLS_CLOSE_GRACE`, errors ignored (the
    caller closes the socket in any case)."""
    with trio.move_on_after(TLS_CLOSE_GRACE):
        try:
            await conn.aclose()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass


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
    """Tell the protocol from the first byte (:mod:`trisocks.server.detect`), then serve it."""
    client: ClientStream
    with ctx.admission.handshaking(session, ip):  # the handshake timeout, and eviction
        protocol, conn = await _detect(stream, ctx)
        if protocol == "socks5":
            request, leftover, client = await handshake(cast(Any, conn), session, ctx)
        elif protocol == "socks4":
            request, leftover = await socks4_handshake(conn, session, ctx)
            client = cast(Any, conn)
    if protocol == "http":  # it enters ctx.admission.handshaking itself, around its request head
        from trisocks.server.http_proxy import serve_http

        await serve_http(cast(Any, conn), session, ctx, ip)
        return
    await serve_request(client, session, ctx, ip, request, leftover)


async def _detect(stream: trio.abc.Stream, ctx: ServerContext) -> tuple[str, trio.abc.Stream]:
    """The enabled protocol the first byte announces, and the stream to go on with.

    Raises:
        HandshakeFailed: EOF before a byte, or no enabled protocol starts with it.
    """
    try:
        protocol, conn = await detect(stream)
    except EOFError:
        raise HandshakeFailed("eof", "client closed before sending a byte") from None
    if protocol is None or protocol not in ctx.config.protocols:
        raise HandshakeFailed(
            "unknown_protocol", f"first byte starts no enabled protocol ({protocol or 'unknown'})"
        )
    return protocol, conn


async def serve_request(
    client: ClientStream,
    session: Session,
    ctx: ServerContext,
    ip: IP,
    request: Request,
    leftover: bytes,
) -> None:
    """Serve a SOCKS request (SOCKS5, or SOCKS4 turned into the same Request): the rules and
    the user's limits, the lifetime, then the command's handler. Replies go out in the
    session's protocol (:func:`trisocks.server.replies.send_reply`)."""
    if session.user is not None:
        ctx.admission.auth_result(ip, ok=True)
    session.command, session.target = request.command, request.address
    ctx.registry.notify("request", session)
    _, refusal = open_request(ctx.judge, ctx.user_limits, session, ip, request)
    if refusal is not None:  # RFC 1928 §6: "connection not allowed by ruleset"
        log.info("session %s: %s %s refused: %s", session.id, COMMAND_NAMES[request.command],
                 quote(str(request.address)), refusal)
        session.close_reason = refusal
        await send_reply(client, session, Reply.NOT_ALLOWED)
        return
    lifetime = ctx.user_limits.max_duration(session)
    if lifetime:  # the session's own scope carries it: no extra scope per session
        session.scope.deadline = trio.current_time() + lifetime
    await HANDLERS[request.command](client, session, request, leftover, ctx)


HANDLERS = {
    Command.CONNECT: handle_connect,
    Command.BIND: handle_bind_routed,
    Command.UDP_ASSOCIATE: handle_udp_routed,
    Command.RESOLVE: handle_resolve,
    Command.RESOLVE_PTR: handle_resolve,
}


NOT_LOGGED = ("state", "started_at", "instance")
"""View fields the access log's record leaves out (the API has them)."""


def log_record(view: SessionView, duration: float) -> dict[str, Any]:
    """The ``session`` record of an access-log line (the JSON log format prints it whole)."""
    fields = view.text()
    for key in NOT_LOGGED:
        del fields[key]
    fields["duration"] = round(duration, 6)
    fields["reason"] = fields.pop("close_reason")
    return fields


def _log_session(ctx: ServerContext, session: Session, duration: float) -> None:
    """Count the session in the stats, and write its access line where the access log is on
    (its level lets INFO through); the line and its record are built only then."""
    stats, counters = ctx.stats, session.counters
    stats.bytes_up += counters.bytes_up
    stats.bytes_down += counters.bytes_down
    if session.reply is not None:
        stats.replies[session.reply] += 1
    stats.protocols[session.protocol] += 1
    if not ctx.access_log.isEnabledFor(logging.INFO):
        return
    view = session.view()
    record = log_record(view, duration)
    ctx.access_log.info(
        "%s user=%s %s %s reply=%s rule=%s up=%d down=%d duration=%.3fs protocol=%s%s%s%s%s%s",
        quote(record["client"]),  # every value a client (or an operator) chose is quoted
        quote(view.user),
        quote(record["command"]),
        quote(record["target"]),
        f"{view.reply:02x}" if view.reply is not None else "-",
        quote(view.rule),
        view.bytes_up,
        view.bytes_down,
        duration,
        view.protocol,
        " tls=yes" if view.tls else "",
        f" parent={quote(view.parent)}" if view.parent is not None else "",
        f" egress={view.egress}" if view.egress is not None else "",
        f" userid={quote(view.userid)}" if view.userid is not None else "",
        f" reason={quote(view.close_reason)}" if view.close_reason else "",
        extra={"session": record},
    )
