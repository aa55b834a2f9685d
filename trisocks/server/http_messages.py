"""HTTP messages on the client connection, for the HTTP proxy (:mod:`.http_proxy`): reading
a request head with h11 and the proxy's own limits (size, field count, no obsolete folding, no
request smuggling), the request target, Basic proxy credentials, error responses, and the
hop-by-hop headers a proxy removes (RFC 9110 §7.6.1). No dialling, no policy.
"""

from __future__ import annotations

import base64
import binascii
import re
import urllib.parse
from collections.abc import Iterable

import h11

from trisocks.protocol import Address
from trisocks.server.control import ClientStream
from trisocks.server.handshake import HandshakeFailed

__all__ = ["CHALLENGE", "HOP_BY_HOP", "MAX_HEADERS", "MAX_HEAD_SIZE", "RECEIVE", "HttpError",
           "credentials", "end_to_end", "header", "next_event", "read_head", "request_target",
           "send_error"]

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


async def send_error(stream: ClientStream, exc: HttpError, head_only: bool = False) -> None:
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


async def next_event(stream: ClientStream, conn: h11.Connection, raw: bytearray | None) -> object:
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


async def read_head(
    stream: ClientStream, conn: h11.Connection, trailing: bytes
) -> h11.Request | None:
    """The next request head; ``None`` on a clean EOF before one began.

    Raises:
        HttpError: malformed (400), too large (431), or a smuggling hazard (400).
    """
    raw = bytearray(trailing)
    try:
        event = await next_event(stream, conn, raw)
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


def header(request: h11.Request, name: bytes) -> bytes | None:
    for key, value in request.headers:
        if key == name:
            return bytes(value)
    return None


def credentials(request: h11.Request) -> tuple[bytes, bytes] | None:
    """The user and password of ``Proxy-Authorization: Basic``; ``None`` without one.

    Raises:
        HttpError: 407 for another scheme or a malformed value.
    """
    value = header(request, b"proxy-authorization")
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


def end_to_end(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """*headers* without the hop-by-hop ones (RFC 9110 §7.6.1), those named by Connection
    included."""
    headers = list(headers)
    named = {
        token.strip().lower()
        for name, value in headers if name == b"connection"
        for token in bytes(value).split(b",")
    }
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP and n not in named]


def request_target(request: h11.Request) -> tuple[Address, bytes | None]:
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
