"""A local auth hook for the ``http`` password backend's tests (no tests here).

:func:`start_hook` serves HTTP/1.1 (trio + h11) on 127.0.0.1 port 0. Every request is recorded
(method, path, headers, JSON body); the answer comes from ``hook.answer``, a function of the
request's JSON body returning ``(status, body)``, optionally after ``hook.delay`` seconds (a
hook that hangs). ``hook.users`` maps names to ``(password, canonical name, groups)`` for the
default answer: ``allow`` with the canonical name and groups for a right password, else
``allow: false``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import attrs
import h11
import trio

__all__ = ["Hook", "Seen", "start_hook"]

MAX_REQUESTS = 1000
"""Requests one connection may carry before the hook closes it (a bound for the loop)."""


@attrs.define
class Seen:
    """One request the hook received."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


@attrs.define
class Hook:
    """The running hook (module docstring)."""

    port: int = 0
    seen: list[Seen] = attrs.field(factory=list)
    users: dict[str, tuple[str, str, list[str]]] = attrs.field(factory=dict)
    answer: Callable[[Any], tuple[int, bytes]] | None = None
    delay: float = 0.0
    waiting: int = 0
    """Requests being answered now (sleeping in ``delay``, say)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/check"

    def default_answer(self, payload: Any) -> tuple[int, bytes]:
        entry = self.users.get(payload.get("user"))
        if entry is None or entry[0] != payload.get("password"):
            return 200, b'{"allow": false}'
        return 200, json.dumps({"allow": True, "user": entry[1], "groups": entry[2]}).encode()


async def _next(conn: h11.Connection, stream: trio.SocketStream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(65536))


async def _serve(hook: Hook, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        for _ in range(MAX_REQUESTS):
            event = await _next(conn, stream)
            if not isinstance(event, h11.Request):
                return
            body = bytearray()
            while isinstance(part := await _next(conn, stream), h11.Data):
                body += part.data
            seen = Seen(event.method.decode(), event.target.decode(),
                        {k.decode().lower(): v.decode() for k, v in event.headers}, bytes(body))
            hook.seen.append(seen)
            hook.waiting += 1
            try:
                if hook.delay:
                    await trio.sleep(hook.delay)
                try:
                    payload = seen.json
                except ValueError:
                    payload = {}
                status, answer = (hook.answer or hook.default_answer)(payload)
            finally:
                hook.waiting -= 1
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(answer)))]
            if 300 <= status < 400:
                headers.append(("Location", "http://127.0.0.1:1/elsewhere"))
            await stream.send_all(conn.send(h11.Response(status_code=status, headers=headers)))
            await stream.send_all(conn.send(h11.Data(data=answer)))
            await stream.send_all(conn.send(h11.EndOfMessage()))
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError):
        pass
    finally:
        await stream.aclose()


async def start_hook(nursery: trio.Nursery) -> Hook:
    """Serve a :class:`Hook` on 127.0.0.1 port 0 until *nursery* is cancelled."""
    hook = Hook()
    listeners = await nursery.start(functools.partial(
        trio.serve_tcp, functools.partial(_serve, hook), 0, host="127.0.0.1"))
    hook.port = listeners[0].socket.getsockname()[1]
    return hook
