"""The HTTP proxy (RFC 9110, RFC 9112): ``CONNECT`` tunnels and absolute-form forwarding.

Messages are parsed and framed by h11 (sans-IO); this module adds what a proxy needs on top:

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

import base64
import binascii
import contextlib
import logging
import re
import socket
import urllib.parse
from collections.abc import Iterable

import h11
import trio

from trisocks.logs import quote
from trisocks.net import format_sockaddr
from trisocks.policy.rules import IP
from trisocks.protocol import Address, AddressType, Command, Reply, Request
from trisocks.server.common import ClientStream, relay_session
from trisocks.server.connect import dial_target
from trisocks.server.context import ServerContext
from trisocks.server.dial import Denied
from trisocks.server.errors import reply_for
from trisocks.server.handshake import HandshakeFailed
from trisocks.sessions import COMMAND_NAMES, Session

__all__ = ["MAX_HEADERS", "MAX_HEAD_SIZE", "serve_http"]

log = logging.getLogger("trisocks.http")

MAX_HEAD_SIZE = 16 * 1024
"""Bytes a request (or response) head may take; beyond it, ``431``."""
MAX_HEADERS = 100
"""Header fields a request may carry; beyond it, ``431``."""
RECEIVE = 64 * 1024
REALM = 'Basic realm="trisocks"'
CHALLENGE = (("Proxy-Authenticate", REALM),)

HOP_BY_HOP = frozenset({
    b"connection", b"proxy-connection", b"keep-alive", b"te", b"trailer",
    b"transfer-encoding", b"upgrade", b"proxy-authorization", b"proxy-authenticate",
})
_OBS_FOLD = re.compile(rb"\n[ \t]")
_NOT_LINE = re.compile(rb"[^\x20-\x7e\r]")
_REASONS = {
    400: "Bad Request", 403: "Forbidden", 407: "Proxy Authentication Required",
    431: "Request Header Fields Too Large", 501: "Not Implemented", 502: "Bad Gateway",
    504: "Gateway Timeout",
}


class HttpError(Exception):
    """A request that gets an error status (and the connection closed)."""

    def __init__(
        self, status: int, detail: str, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        super().__init__(f"http {status}: {detail}")
        self.status = status
        self.detail = detail
        self.headers = tuple(headers)


async def _send_error(stream: ClientStream, exc: HttpError, head_only: bool = False) -> None:
    reason = _REASONS.get(exc.status, "Error")
    body = f"{exc.status} {reason}: {exc.detail}\n".encode()
    lines = [
        f"HTTP/1.1 {exc.status} {reason}",
        "Content-Type: text/plain; charset=utf-8",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "Via: 1.1 trisocks",
        *(f"{name}: {value}" for name, value in exc.headers),
    ]
    await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode() + (b"" if head_only else body))


async def _next_event(stream: ClientStream, conn: h11.Connection, raw: bytearray | None) -> object:
    """The next h11 event from the client, reading as needed (*raw* keeps what was read)."""
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        data = await stream.receive_some(RECEIVE)
        if raw is not None:
            raw += data
            _check_request_line(raw)
        conn.receive_data(bytes(data))


def _check_request_line(raw: bytearray) -> None:
    """Refuse at once what cannot become a request line (only visible ASCII and spaces):
    h11 would wait for its end, holding a handshake slot, until the head size limit.

    Raises:
        HttpError: 400.
    """
    start = len(raw) - len(raw.lstrip(b"\r\n"))  # empty lines before it are allowed
    end = raw.find(b"\n", start)
    if _NOT_LINE.search(raw, start, len(raw) if end < 0 else end):
        raise HttpError(400, "not an HTTP request line")


async def _read_head(
    stream: ClientStream, conn: h11.Connection, trailing: bytes
) -> h11.Request | None:
    """The next request head; ``None`` on a clean EOF before one began.

    Raises:
        HttpError: malformed (400), too large (431), or a smuggling hazard (400).
    """
    raw = bytearray(trailing)
    try:
        event = await _next_event(stream, conn, raw)
    except h11.RemoteProtocolError as exc:
        status = exc.error_status_hint if exc.error_status_hint in (431, 501) else 400
        raise HttpError(status, str(exc)) from None
    if isinstance(event, h11.ConnectionClosed):
        if raw.strip():
            raise HandshakeFailed("eof", "client closed in the middle of a request head")
        return None
    assert isinstance(event, h11.Request), event
    end = min((i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0), default=len(raw))
    if end > MAX_HEAD_SIZE:  # h11 checks only a head still incomplete after a read
        raise HttpError(431, f"request head over {MAX_HEAD_SIZE} bytes")
    if _OBS_FOLD.search(raw, raw.find(b"\n") + 1 if b"\n" in raw else 0, end):
        raise HttpError(400, "obsolete line folding in the request head")
    names = [name for name, _ in event.headers]
    if len(names) > MAX_HEADERS:
        raise HttpError(431, f"more than {MAX_HEADERS} header fields")
    if b"transfer-encoding" in names and b"content-length" in names:
        raise HttpError(400, "both Content-Length and Transfer-Encoding")
    return event


def _header(request: h11.Request, name: bytes) -> bytes | None:
    for key, value in request.headers:
        if key == name:
            return bytes(value)
    return None


def _credentials(request: h11.Request) -> tuple[bytes, bytes] | None:
    """The user and password of ``Proxy-Authorization: Basic``; ``None`` without one.

    Raises:
        HttpError: 407 for another scheme or a malformed value.
    """
    value = _header(request, b"proxy-authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"basic":
        raise HttpError(407, "only Basic proxy authentication is supported", CHALLENGE)
    try:
        decoded = base64.b64decode(token.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(407, "malformed Basic credentials", CHALLENGE) from None
    user, colon, password = decoded.partition(b":")
    if not colon:
        raise HttpError(407, "malformed Basic credentials", CHALLENGE)
    return user, password


async def _authenticate(
    stream: ClientStream, request: h11.Request, ctx: ServerContext,
    known: dict[bytes, str], identified: str | None,
) -> str | None:
    """The request's user (``None``: anonymous, where ``auth`` allows ``none``).

    Raises:
        HttpError: 407 when credentials are missing where they are required.
        HandshakeFailed: wrong credentials (after answering 407): counted, and backed off.
    """
    if identified is not None:  # a TLS client certificate named the user: no password
        return identified
    methods = ctx.config.auth
    creds = _credentials(request)
    if creds is None or "password" not in methods:
        if "none" in methods:
            return None
        raise HttpError(407, "proxy authentication required", CHALLENGE)
    value = _header(request, b"proxy-authorization") or b""
    if value in known:  # checked on this connection already
        return known[value]
    with ctx.guard.server_work():  # not stalled: not evictable meanwhile
        user = await ctx.authenticator.check(*creds)
    if user is None:
        await _send_error(stream, HttpError(407, "bad credentials", CHALLENGE))
        name = creds[0].decode(errors="replace")
        raise HandshakeFailed("auth_failed", f"bad credentials for user {name!r}")
    known[value] = user
    return user


def _target(request: h11.Request) -> tuple[Address, bytes | None]:
    """Where the request goes, and (absolute form) the origin-form target to send there.

    Raises:
        HttpError: 400 for a target that is neither, 501 for a scheme other than http.
    """
    target = bytes(request.target).decode("ascii", errors="replace")
    try:
        if request.method == b"CONNECT":
            url = urllib.parse.urlsplit("//" + target)
            if url.path or url.query or url.username is not None or url.port is None:
                raise ValueError("CONNECT needs host:port")
            path = None
        else:
            url = urllib.parse.urlsplit(target)
            if url.scheme.lower() == "https":
                raise HttpError(501, "https:// is not forwarded; use CONNECT")
            if url.scheme.lower() != "http":
                raise ValueError("not an absolute http:// URI (a proxy needs the absolute form)")
            path = (url.path or "/").encode() + (b"?" + url.query.encode() if url.query else b"")
        host, port = url.hostname, url.port if url.port is not None else 80
    except ValueError as exc:
        raise HttpError(400, f"bad request target {target!r}: {exc}") from None
    if not host or not 0 < port < 65536 or len(host.encode()) > 255:
        raise HttpError(400, f"bad request target {target!r}")
    return Address.of(host, port), path


async def serve_http(stream: ClientStream, session: Session, ctx: ServerContext, ip: IP) -> None:
    """Serve an HTTP proxy client (the connection's first byte was an ASCII letter) until it
    closes, fails, or a request ends the connection."""
    session.protocol = "http"
    identified = session.user  # set by a TLS client certificate, if any
    trailing = b""
    known: dict[bytes, str] = {}
    first = True
    while True:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_SIZE)
        if trailing:
            conn.receive_data(trailing)
        try:
            if first:
                with ctx.guard.handshaking(session, ip):
                    request = await _read_head(stream, conn, trailing)
                    if request is None:
                        raise HandshakeFailed("eof", "client closed during the handshake")
                    user = await _authenticate(stream, request, ctx, known, identified)
                if user is not None:
                    ctx.guard.auth_result(ip, ok=True)
            else:
                with trio.move_on_after(ctx.config.idle_timeout) as idle:
                    request = await _read_head(stream, conn, trailing)
                if idle.cancelled_caught:
                    session.close_reason = "idle timeout (between requests)"
                    return
                if request is None:
                    return
                user = await _authenticate(stream, request, ctx, known, identified)
                if user != session.user:
                    raise HttpError(400, "a connection serves one user; reconnect to switch")
            address, path = _target(request)
        except HttpError as exc:
            if first:
                ctx.stats.handshake_failures["no_acceptable_method" if exc.status == 407
                                             else "malformed"] += 1
            session.close_reason = str(exc)
            await _send_error(stream, exc)
            return
        session.user = user
        if first:
            lifetime = ctx.guard.max_duration(session)
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
    session.command = COMMAND_NAMES[Command.CONNECT]
    session.target = str(address)
    ctx.registry.notify("request", session)
    _, refusal = ctx.guard.open_request(session, ip, Request(Command.CONNECT, address))
    if refusal is not None:
        log.info("session %s: HTTP %s refused: %s", session.id, quote(session.target), refusal)
        session.reply = Reply.NOT_ALLOWED
        raise HttpError(403, refusal)


async def _dial(session: Session, ctx: ServerContext, address: Address) -> trio.SocketStream:
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
        session.resolved = format_sockaddr(upstream.socket.getpeername())
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
        await _send_error(stream, exc)
        return
    try:
        while not isinstance(await _next_event(stream, conn, None), h11.EndOfMessage):
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


def _end_to_end(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """*headers* without the hop-by-hop ones (RFC 9110 §7.6.1), those named by Connection
    included."""
    headers = list(headers)
    named = {
        token.strip().lower()
        for name, value in headers if name == b"connection"
        for token in bytes(value).split(b",")
    }
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP and n not in named]


async def _forward(
    stream: ClientStream, conn: h11.Connection, session: Session, ctx: ServerContext,
    ip: IP, address: Address, path: bytes, request: h11.Request,
) -> bool:
    """Forward one absolute-form request; return whether the client connection goes on."""
    ctx.guard.end_request(session)  # a keep-alive connection holds one request's slot
    try:
        _open(session, ctx, ip, address)
        upstream = await _dial(session, ctx, address)
    except HttpError as exc:
        session.close_reason = str(exc)
        await _send_error(stream, exc, head_only=request.method == b"HEAD")
        return False
    counters = session.counters
    up_throttle, down_throttle = ctx.guard.throttles(session)
    version = bytes(request.http_version)
    sent_head = False
    try:
        ctx.registry.set_state(session, "relaying")
        origin = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_SIZE)
        headers = [(n, v) for n, v in _end_to_end(request.headers)
                   if n not in (b"host", b"expect")]
        host = address.host if address.atyp != AddressType.IPV6 else f"[{address.host}]"
        authority = host if address.port == 80 else f"{host}:{address.port}"
        headers.insert(0, (b"Host", authority.encode()))
        if _header(request, b"transfer-encoding") is not None:
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
                event = await _next_event(stream, conn, None)
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
                origin.receive_data(data)
            elif isinstance(event, h11.InformationalResponse):
                continue  # 1xx: ours (100) was sent already; Upgrade is not forwarded
            elif isinstance(event, h11.Response):
                response = [(n, v) for n, v in _end_to_end(event.headers)]
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
            await _send_error(stream, exc, head_only=request.method == b"HEAD")
        return False
    except (OSError, trio.BrokenResourceError) as exc:
        session.close_reason = f"relay: {exc}"
        if not sent_head:  # the origin failed (or the client is gone: then this fails too)
            session.reply = Reply.GENERAL_FAILURE
            with contextlib.suppress(OSError, trio.BrokenResourceError, trio.ClosedResourceError):
                await _send_error(stream, HttpError(502, f"origin failed: {exc}"))
        return False
    finally:
        upstream.socket.close()
    session.close_reason = "client closed"
    if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
        conn.start_next_cycle()
        return True
    return False
