"""Server-sent events for the dashboard: session start, update and end, batched.

Wire format (``text/event-stream``): each message is ``event: start|update|end`` and one
``data:`` line holding ``{"sessions": [<session>, ...]}``. A new subscriber first gets one
``start`` message with every live session (possibly empty), so it never needs a separate
listing. Then:

- ``start`` and ``end`` are batched every ``batch_interval`` (0.25 s); a session that starts
  and ends within one batch is not announced at all;
- ``update`` carries the sessions whose record changed (state, counters, ...), compared once per
  ``update_interval`` (1 s): at most one update per session per second, however busy it is.

The proxy never waits for a subscriber. Registry listeners only append to lists; the hub's own
task serializes each batch once and hands it to every subscriber with ``send_nowait`` into a
bounded queue. A subscriber whose queue is full has fallen behind: its stream is ended (the
dashboard reconnects and gets a fresh ``start``), rather than silently missing events.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import trio

from trisocks.admin.shapes import session_json
from trisocks.sessions import Session, SessionRegistry

__all__ = ["EventHub"]


KEEPALIVE_INTERVAL = 15.0
"""Seconds between SSE comment lines sent to every subscriber even when nothing changes."""


def _message(event: str, sessions: list[dict[str, Any]]) -> bytes:
    data = json.dumps({"sessions": sessions}, separators=(",", ":"))
    return f"event: {event}\ndata: {data}\n\n".encode()


class EventHub:
    """Fans session events out to SSE subscribers (see the module docstring)."""

    def __init__(
        self,
        registry: SessionRegistry,
        *,
        queue_size: int = 32,
        batch_interval: float = 0.25,
        update_interval: float = 1.0,
    ) -> None:
        self._registry = registry
        self._queue_size = queue_size
        self._batch_interval = batch_interval
        self._update_interval = update_interval
        self._subscribers: set[trio.MemorySendChannel[bytes]] = set()
        self._started: dict[Session, None] = {}
        """Sessions not announced yet (a dict: ordered, and O(1) removal)."""
        self._ended: list[dict[str, Any]] = []
        """Final records of announced sessions that ended since the last batch."""
        self._announced: dict[Session, dict[str, Any] | None] = {}
        """Live announced sessions, with their shape as last sent (sent again when it
        changed); ``None`` while nobody subscribes (nothing is built for nobody)."""
        self._closed = False

    def _on_event(self, event: str, session: Session) -> None:
        if event == "start":
            self._started[session] = None
        elif event == "end":
            if session in self._started:  # never announced: say nothing at all
                del self._started[session]
            else:
                self._announced.pop(session, None)
                if self._subscribers:
                    self._ended.append(session_json(session.view()))

    def _changes(self, *, with_updates: bool) -> list[bytes]:
        started, self._started = list(self._started), {}
        ended, self._ended = self._ended, []
        if not self._subscribers:  # keep track of who is announced; build nothing
            self._announced.update(dict.fromkeys(started))
            return []
        updated = []
        if with_updates:
            for session, seen in self._announced.items():
                if (now := session_json(session.view())) != seen:
                    self._announced[session] = now
                    updated.append(now)
        shapes = [session_json(session.view()) for session in started]
        for session, shape in zip(started, shapes, strict=True):
            self._announced[session] = shape
        batches = (("start", shapes), ("update", updated))
        messages = [_message(name, batch) for name, batch in batches if batch]
        if ended:
            messages.append(_message("end", ended))
        return messages

    def _broadcast(self, messages: list[bytes]) -> None:
        for channel in list(self._subscribers):
            try:
                for message in messages:
                    channel.send_nowait(message)
            except (trio.WouldBlock, trio.BrokenResourceError):
                self._subscribers.discard(channel)
                channel.close()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Batch and send events until :meth:`close`; started once it follows the registry."""
        self._registry.add_listener(self._on_event)
        self._announced = dict.fromkeys(self._registry)
        task_status.started()
        next_update = trio.current_time() + self._update_interval
        next_ping = trio.current_time() + KEEPALIVE_INTERVAL
        try:
            while not self._closed:
                await trio.sleep(self._batch_interval)
                now = trio.current_time()
                with_updates = now >= next_update
                if with_updates:
                    next_update += self._update_interval
                messages = self._changes(with_updates=with_updates)
                if now >= next_ping:
                    # a comment line: lets a client tell a quiet stream from a dead one
                    messages.append(b": keepalive\n\n")
                    next_ping = now + KEEPALIVE_INTERVAL
                if messages and self._subscribers:
                    self._broadcast(messages)
        finally:
            self._registry.remove_listener(self._on_event)

    def close(self) -> None:
        """End every stream (at shutdown) and refuse new subscribers."""
        self._closed = True
        for channel in self._subscribers:
            channel.close()
        self._subscribers.clear()

    @contextlib.contextmanager
    def subscribe(self) -> Iterator[trio.MemoryReceiveChannel[bytes]]:
        """A queue of SSE messages, starting with every live announced session."""
        send, receive = trio.open_memory_channel[bytes](self._queue_size)
        with send, receive:
            announced = [s for s in self._registry if s not in self._started]
            snapshot = [session_json(s.view()) for s in announced]
            for session, shape in zip(announced, snapshot, strict=True):
                if self._announced.get(session) is None:  # built for nobody until now
                    self._announced[session] = shape
            send.send_nowait(_message("start", snapshot))
            if self._closed:
                send.close()
            else:
                self._subscribers.add(send)
            try:
                yield receive
            finally:
                self._subscribers.discard(send)

    async def stream(self) -> AsyncIterator[bytes]:
        """The body of one ``GET /api/events`` response."""
        with self.subscribe() as messages:
            async for message in messages:
                yield message
