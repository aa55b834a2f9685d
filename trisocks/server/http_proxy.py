"""The HTTP proxy (RFC 9110, RFC 9112): ``CONNECT`` tunnels and absolute-form forwarding.

Messages are parsed and framed by h11 (sans-IO), read and checked by :mod:`.http_messages`;
this module adds what a proxy does with them:

- ``CONNECT host:port`` is judged and dialled like a SOCKS5 CONNECT (the same rules, the same
  resolve-once dialling, the same relay engines: splice when both ends are plain sockets) and
  answered ``200 Connection established``.
- ``GET http://host/path`` (any method, absolute form, ``http`` scheme only) is forwarded to
  the origin over a fresh connection (one per request, closed after its response), with the
  hop-by-hop headers removed (RFC 9110 §7.6.1) and ``Via`` added; the client's connection is
  kept alive across requests, each judged and dialled on its own. Bodies are streamed both
  ways; h11 re-frames them (chunked where the length is unknown).
- ``https://`` absolute-form is answered ``501``: this proxy does not originate TLS (clients
  use CONNECT for https).
- ``Proxy-Authorization: Basic`` is checked against the RFC 1929 user store; where the
  server's ``auth`` asks for a password (and does not allow ``none``) a request without it
  gets ``407``. A user named by a TLS client certificate needs no password (the header is
  then ignored), as in the SOCKS5 handshake.

One client connection is one session: its user is the first request's, and a later request
that authenticates as someone else is refused (``400``, then close). The session's ``reply``
holds the SOCKS5 REP equivalent of the outcome (00, 02, 04, ...) so statistics and the
access log read alike for both protocols; the HTTP status is in the close reason when the
request failed.
"""

from __future__ import annotations

import contextlib
import logging
import socket

import h11
import trio

from trisocks.client import SocksStream
from trisocks.identity.model import Identity, parse_account
from trisocks.logs import quote
from trisocks.net import peer_address
from trisocks.policy.rules import IP
from trisocks.protocol import Address, AddressType, Command, Reply, Request
from trisocks.server.connect import dial_target
from trisocks.server.context import ServerContext
from trisocks.server.control import ClientStream
from trisocks.server.dial import Denied
from trisocks.server.errors import reply_for
from trisocks.server.handshake import HandshakeFailed
from trisocks.server.http_messages import (
    CHALLENGE,
    MAX_HEAD_SIZE,
    RECEIVE,
    HttpError,
    credentials,
    end_to_end,
    header,
    next_event,
    read_head,
    request_target,
    send_error,
)
from trisocks.server.judge import end_request, open_request
from trisocks.server.logins import identify, password_login
from trisocks.server.relay import relay_session
from trisocks.sessions import Session

__all__ = ["serve_http"]

log = logging.getLogger("trisocks.http")

async def _authenticate(
    stream: ClientStream, request: h11.Request, ctx: ServerContext,
    known: dict[bytes, Identity], identified: Identity | None, session: Session,
) -> Identity | None:
    """The request's identity (``None``: anonymous, where ``auth`` allows ``none``).

    Raises:
        HttpError: 407 when credentials are missing where they are required.
        HandshakeFailed: wrong credentials (after answering 407): counted, and backed off.
    """
    if identified is not None:  # a TLS client certificate named the user: no password
        return identified
    methods = ctx.config.auth
    creds = credentials(request)
    if creds is None or "password" not in methods:
        if "none" in methods:
            return None
        raise HttpError(407, "proxy authentication required", CHALLENGE)
    value = header(request, b"proxy-authorization") or b""
    if value in known:  # checked on this connection already
        return known[value]
    identity = await password_login(ctx, session, stream, *creds, "http")
    if identity is None:
        await send_error(stream, HttpError(407, "bad credentials", CHALLENGE))
        name = creds[0].decode(errors="replace")
        raise HandshakeFailed("auth_failed", f"bad credentials for user {name!r}")
    known[value] = identity
    return identity


async def serve_http(stream: ClientStream, session: Session, ctx: ServerContext, ip: IP) -> None:
    """Serve an HTTP proxy client (the connection's first byte was an ASCII letter) until it
    closes, fails, or a request ends the connection."""
    session.protocol = "http"
    identified = None  # named by a TLS client certificate, if any
    if session.user is not None:
        identified = Identity(session.source or "tls", parse_account(session.user)[1],
                              session.groups)
    trailing = b""
    known: dict[bytes, Identity] = {}
    first = True
    while True:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)
        if trailing:
            conn.receive_data(trailing)
        try:
            if first:
                with ctx.admission.handshaking(session, ip):
                    request = await read_head(stream, conn, trailing)
                    if request is None:
                        raise HandshakeFailed("eof", "client closed during the handshake")
                    identity = await _authenticate(stream, request, ctx, known, identified,
                                                   session)
                if identity is not None:
                    ctx.admission.auth_result(ip, ok=True)
            else:
                with trio.move_on_after(ctx.config.idle_timeout) as idle:
                    request = await read_head(stream, conn, trailing)
                if idle.cancelled_caught:
                    session.close_reason = "idle timeout (between requests)"
                    return
                if request is None:
                    return
                identity = await _authenticate(stream, request, ctx, known, identified,
                                               session)
                if (identity and identity.account) != session.user:
                    raise HttpError(400, "a connection serves one user; reconnect to switch")
            address, path = request_target(request)
        except HttpError as exc:
            if first:
                ctx.stats.handshake_failures["no_acceptable_method" if exc.status == 407
                                             else "malformed"] += 1
            session.close_reason = str(exc)
            await send_error(stream, exc)
            return
        if identity is not None:
            identify(session, identity)
        if first:
            lifetime = ctx.user_limits.max_duration(session)
            if lifetime:
                session.scope.deadline = trio.current_time() + lifetime
        if path is None:
            session.protocol = "http-connect"
            await _connect(stream, conn, session, ctx, ip, address)
            return
        again = await _forward(stream, conn, session, ctx, ip, address, path, request)
        if not again:
            return
        trailing, _ = conn.trailing_data
        trailing = bytes(trailing)
        first = False


def _open(session: Session, ctx: ServerContext, ip: IP, address: Address) -> None:
    """Judge the request like a SOCKS5 CONNECT.

    Raises:
        HttpError: 403 when a rule (or a limit) refuses it.
    """
    session.command, session.target = Command.CONNECT, address
    ctx.registry.notify("request", session)
    _, refusal = open_request(ctx.judge, ctx.user_limits, session, ip,
                              Request(Command.CONNECT, address))
    if refusal is not None:
        log.info("session %s: HTTP %s refused: %s", session.id, quote(str(address)), refusal)
        session.reply = Reply.NOT_ALLOWED
        raise HttpError(403, refusal)


async def _dial(
    session: Session, ctx: ServerContext, address: Address
) -> trio.SocketStream | SocksStream:
    """Connect to *address* like a SOCKS5 CONNECT does.

    Raises:
        HttpError: 403 (a resolved address is denied), 502 (refused, unreachable, no such
        name), 504 (the connect timeout passed).
    """
    try:
        upstream = await dial_target(session, ctx, address)
    except Denied as exc:
        session.reply = Reply.NOT_ALLOWED
        raise HttpError(403, str(exc)) from None
    except trio.TooSlowError:
        session.reply = Reply.TTL_EXPIRED
        raise HttpError(504, "connect timed out") from None
    except OSError as exc:
        session.reply = reply_for(exc)
        detail = "name does not resolve" if isinstance(exc, socket.gaierror) else str(exc)
        raise HttpError(502, f"connect failed: {detail}") from None
    try:
        if session.parent is None:  # through a parent, dial_via knows (or not) the address
            session.resolved = peer_address(upstream.socket.getpeername())
    except OSError as exc:
        upstream.socket.close()
        session.reply = Reply.GENERAL_FAILURE
        raise HttpError(502, f"connect failed: {exc}") from None
    return upstream


async def _connect(
    stream: ClientStream, conn: h11.Connection, session: Session, ctx: ServerContext,
    ip: IP, address: Address,
) -> None:
    try:
        _open(session, ctx, ip, address)
        upstream = await _dial(session, ctx, address)
    except HttpError as exc:
        session.close_reason = str(exc)
        await send_error(stream, exc)
        return
    try:
        while not isinstance(await next_event(stream, conn, None), h11.EndOfMessage):
            pass  # a CONNECT body (none is defined) is read away
        session.reply = Reply.SUCCEEDED
        head = conn.send(h11.Response(status_code=200, reason=b"Connection established",
                                      headers=[(b"Via", b"1.1 trisocks")]))
        await stream.send_all(head or b"")
        leftover, _ = conn.trailing_data
        # splice for a plain socket; TLS (or a wrapper) through Python: relay() chooses
        await relay_session(stream, upstream, bytes(leftover), session, ctx)
    except h11.RemoteProtocolError as exc:
        session.close_reason = f"http 400: {exc}"
    finally:
        upstream.socket.close()


async def _forward(
    stream: ClientStream, conn: h11.Connection, session: Session, ctx: ServerContext,
    ip: IP, address: Address, path: bytes, request: h11.Request,
) -> bool:
    """Forward one absolute-form request; return whether the client connection goes on."""
    end_request(ctx.judge, ctx.user_limits, session)  # keep-alive: one request's slot held
    try:
        _open(session, ctx, ip, address)
        upstream = await _dial(session, ctx, address)
    except HttpError as exc:
        session.close_reason = str(exc)
        await send_error(stream, exc, head_only=request.method == b"HEAD")
        return False
    counters = session.counters
    up_throttle, down_throttle = ctx.user_limits.throttles(session)
    version = bytes(request.http_version)
    sent_head = False
    try:
        ctx.registry.set_state(session, "relaying")
        origin = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_SIZE)
        headers = [(n, v) for n, v in end_to_end(request.headers)
                   if n not in (b"host", b"expect")]
        host = address.host if address.atyp != AddressType.IPV6 else f"[{address.host}]"
        authority = host if address.port == 80 else f"{host}:{address.port}"
        headers.insert(0, (b"Host", authority.encode()))
        if header(request, b"transfer-encoding") is not None:
            headers.append((b"Transfer-Encoding", b"chunked"))
        headers += [(b"Via", b"%s trisocks" % version), (b"Connection", b"close")]
        out = origin.send(h11.Request(method=request.method, target=path, headers=headers))

        async def up(data: bytes) -> None:
            await upstream.send_all(data)
            counters.bytes_up += len(data)
            if up_throttle is not None:
                await up_throttle(len(data))

        await up(out or b"")
        if conn.they_are_waiting_for_100_continue:
            go_on = h11.InformationalResponse(status_code=100, headers=[])
            await stream.send_all(conn.send(go_on) or b"")
        while True:  # the request body, streamed
            try:
                event = await next_event(stream, conn, None)
            except h11.RemoteProtocolError as exc:
                raise HttpError(400, str(exc)) from None
            if isinstance(event, h11.Data):
                await up(origin.send(h11.Data(data=bytes(event.data))) or b"")
            elif isinstance(event, h11.EndOfMessage):
                await up(origin.send(h11.EndOfMessage()) or b"")
                break
            else:
                raise HttpError(400, "client closed in the middle of the request body")
        while True:  # the response, streamed
            try:
                event = origin.next_event()
            except h11.RemoteProtocolError as exc:
                raise HttpError(502, f"bad response from the origin: {exc}") from None
            if event is h11.NEED_DATA:
                try:
                    with trio.fail_after(ctx.config.idle_timeout):
                        data = await upstream.receive_some(RECEIVE)
                except trio.TooSlowError:
                    raise HttpError(504, "the origin did not answer in time") from None
                counters.bytes_down += len(data)
                if down_throttle is not None:
                    await down_throttle(len(data))
                origin.receive_data(bytes(data))
            elif isinstance(event, h11.InformationalResponse):
                continue  # 1xx: ours (100) was sent already; Upgrade is not forwarded
            elif isinstance(event, h11.Response):
                response = [(n, v) for n, v in end_to_end(event.headers)]
                response.append((b"Via", b"%s trisocks" % bytes(event.http_version)))
                await stream.send_all(conn.send(h11.Response(
                    status_code=event.status_code, reason=event.reason, headers=response,
                )) or b"")
                sent_head = True
                session.reply = Reply.SUCCEEDED
            elif isinstance(event, h11.Data):
                await stream.send_all(conn.send(h11.Data(data=bytes(event.data))) or b"")
            elif isinstance(event, h11.EndOfMessage):
                await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
                break
            else:  # ConnectionClosed before the response ended
                if not sent_head:
                    raise HttpError(502, "the origin closed without a response")
                session.close_reason = "origin closed in the middle of the response"
                return False
    except HttpError as exc:
        session.close_reason = str(exc)
        if exc.status == 502:
            session.reply = Reply.GENERAL_FAILURE
        if not sent_head:
            await send_error(stream, exc, head_only=request.method == b"HEAD")
        return False
    except (OSError, trio.BrokenResourceError) as exc:
        session.close_reason = f"relay: {exc}"
        if not sent_head:  # the origin failed (or the client is gone: then this fails too)
            session.reply = Reply.GENERAL_FAILURE
            with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                await send_error(stream, HttpError(502, f"origin failed: {exc}"))
        return False
    finally:
        upstream.socket.close()
    session.close_reason = "client closed"
    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
        conn.start_next_cycle()
        return True
    return False
