"""An HTTP/1.1 origin for the HTTP proxy tests (h11, in the test's trio run), and a server
fixture helper that serves the HTTP proxy."""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path
from typing import Any

import attrs
import h11
import pytest
import trio

import trisocks.server.session as session_module
from trisocks.server.http_proxy import serve_http

CHUNK = 64 * 1024


def route_http(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every connection an HTTP proxy client, until session.py dispatches by the first
    byte itself (then the real dispatch is tested)."""
    if "serve_http" not in inspect.getsource(session_module):
        monkeypatch.setattr(session_module, "_serve", serve_http)


@attrs.define
class Origin:
    host: str
    port: int
    root: Path | None
    heads: list[dict[str, Any]] = attrs.Factory(list)
    """Each request as the origin saw it: method, target, headers (lower-case names)."""

    @property
    def base(self) -> str:
        return f"http://{self.host}:{self.port}"


async def _serve(origin: Origin, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = await _next(stream, conn)
            if not isinstance(event, h11.Request):
                return
            body = bytearray()
            while isinstance(part := await _next(stream, conn), h11.Data):
                body += part.data
            headers = [(n.decode(), v.decode()) for n, v in event.headers]
            target = event.target.decode()
            origin.heads.append({"method": event.method.decode(), "target": target,
                                 "headers": headers, "body_length": len(body)})
            await _respond(origin, stream, conn, event, target, bytes(body), headers)
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, OSError, h11.ProtocolError):
        pass
    finally:
        await stream.aclose()


async def _next(stream: trio.SocketStream, conn: h11.Connection) -> Any:
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await stream.receive_some(CHUNK))
    return event


async def _respond(
    origin: Origin, stream: trio.SocketStream, conn: h11.Connection, request: h11.Request,
    target: str, body: bytes, headers: list[tuple[str, str]],
) -> None:
    path = target.split("?")[0]
    chunked = path.startswith("/chunked/")
    if path == "/echo":
        payload, status = body, 200
    elif path == "/headers":
        payload, status = json.dumps(headers).encode(), 200
    elif path == "/hop":
        payload, status = b"hop", 200
        extra = [("Connection", "x-secret"), ("X-Secret", "1"), ("Keep-Alive", "timeout=5")]
    else:
        file = origin.root / path.removeprefix("/chunked").lstrip("/") if origin.root else None
        if file is not None and file.is_dir():
            file = file / "index.html"
        if file is not None and file.is_file():
            payload, status = file.read_bytes(), 200
        else:
            payload, status = b"not found\n", 404
    out: list[tuple[str, str]] = extra if path == "/hop" else []
    if path.endswith("/") or path.endswith(".html"):
        out.append(("Content-Type", "text/html"))
    if not chunked:
        out.append(("Content-Length", str(len(payload))))
    await stream.send_all(conn.send(h11.Response(status_code=status, headers=out)))
    if request.method != b"HEAD":
        for i in range(0, len(payload), CHUNK):
            await stream.send_all(conn.send(h11.Data(data=payload[i:i + CHUNK])))
    await stream.send_all(conn.send(h11.EndOfMessage()))


async def start_origin(nursery: trio.Nursery, root: Path | None = None) -> Origin:
    """An origin serving files under *root*, ``/chunked/<file>`` (the same, chunked),
    ``/echo`` (the request body back), ``/headers`` (the request's headers as JSON) and
    ``/hop`` (a response with hop-by-hop headers)."""
    origin = Origin("127.0.0.1", 0, root)
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, functools.partial(_serve, origin), 0, host="127.0.0.1")
    )
    origin.port = listeners[0].socket.getsockname()[1]
    return origin
