"""The relaying phase: bytes both ways between the client and the target until both have
ended, and how the relay ended, as the session's close reason.

One loop (:func:`relay`) for every session. Each direction is a pump. Between two plain
sockets the server's :class:`~trisocks.server.engines.Engine` moves it by file descriptor
(splice or copy); a client stream that is not a plain socket (TLS, RFC 1961 GSSAPI wrapping,
a wrapper holding bytes already read) cannot be moved so, and goes through ``receive_some`` and
``send_all`` instead (:func:`relay_streams`). Either way one state counts payload bytes (never
TLS or GSS-API wrapping), applies the throttles, keeps the idle deadline and judges the end.

How a relay ended, the session's close reason, is judged in
:mod:`trisocks.server.relay_state`, whatever carries the bytes. Sessions between two plain
sockets with no throttle are carried by the hub (:mod:`trisocks.server.hub`) while it runs;
:func:`relay` here is every other relay's loop (and each one's when no hub runs).
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

import trio
from trio.lowlevel import checkpoint

from trisocks.server.engines import ALREADY_CLOSED, Engine
from trisocks.server.relay_state import RelayState
from trisocks.sessions import Counters, Session
from trisocks.throttle import Throttle

if TYPE_CHECKING:
    from trisocks.server.context import ServerContext

__all__ = ["relay", "relay_session", "relay_streams"]

IDLE_SLACK = 1.0
"""Seconds by which a relay's idle timeout may be late (see :class:`_Relay`)."""
STREAM_CHUNK = 64 * 1024
""":func:`relay_streams`: bytes asked of ``receive_some`` at a time (TLS records hold 16 KiB,
a GSS-API frame 64 KiB)."""

Throttles = tuple[Throttle | None, Throttle | None]
"""(up, down): what holds each direction to a rate; ``None`` where nothing does."""


class _Relay(RelayState):
    """The state of a relay carried by two pump tasks in a nursery.

    The idle timeout is the deadline of the relay nursery's own cancel scope, so it needs no
    scope of its own. Moving a deadline costs microseconds (trio re-files it), too much per
    chunk; so it moves at most once per ``slack`` seconds, and then to ``idle_timeout + slack``
    ahead: a relay ends between idle_timeout and idle_timeout + slack after its last byte,
    never earlier.
    """

    __slots__ = ("next_move", "nursery", "scope", "slack")

    def __init__(
        self,
        counters: Counters,
        idle_timeout: float,
        nursery: trio.Nursery,
        client: trio.abc.Stream,
        target: trio.abc.Stream,
    ) -> None:
        super().__init__(counters, idle_timeout, client, target)
        now = trio.current_time()
        scope = nursery.cancel_scope
        self.nursery = nursery
        self.slack = min(IDLE_SLACK, idle_timeout / 10)
        self.next_move = now + self.slack
        self.scope = scope
        scope.deadline = now + idle_timeout

    def _touch(self) -> None:
        now = trio.current_time()
        if now >= self.next_move:
            self.scope.deadline = now + self.idle_timeout + self.slack
            self.next_move = now + self.slack

    def up(self, n: int) -> None:
        self.counters.bytes_up += n
        self._touch()

    def down(self, n: int) -> None:
        self.counters.bytes_down += n
        self._touch()

    async def pump_stream(
        self,
        src: trio.abc.ReceiveStream,
        dst: trio.abc.SendStream,
        side: str,
        throttle: Throttle | None,
    ) -> None:
        """Move one direction between streams, from *side* (``client`` or ``target``, whose
        stream *src* is) to the other: what an engine's pump does for two sockets. A failure
        is put down to the side whose stream raised it."""
        add, other = (self.up, "target") if side == "client" else (self.down, "client")
        where = side
        try:
            while True:
                where = side
                try:
                    data = await src.receive_some(STREAM_CHUNK)
                except trio.BrokenResourceError as exc:
                    if not _ragged_eof(exc):
                        raise
                    data = b""
                if not data:
                    break
                where = other
                await dst.send_all(data)
                add(len(data))
                if throttle is not None:
                    await throttle(len(data))
            where = other
            if self.up_done or self.down_done or not _half_closes(dst):
                self._done(side)  # both ends done, or no half-close: the relay is over
                if self.pending is None:
                    self.outcome = f"{self.first} closed"
                self.scope.cancel()
                return
            await _send_eof(dst)
            self._done(side)
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._fail(exc, where)

    def _schedule_decision(self) -> None:
        self.nursery.start_soon(self._decide)

    async def _decide(self) -> None:
        """Judge the first failure, then end the relay. One scheduling pass later: an EOF the
        other direction got at the same moment (the target's, as the client resets right after
        its last read) is seen first, and decides whether the failure is a normal end."""
        await checkpoint()
        self.outcome = self._verdict()
        self.scope.cancel()


async def _send_eof(stream: trio.abc.SendStream) -> None:
    """Pass an EOF on; a receiver that has closed already (ENOTCONN, EPIPE) had everything
    before it, as between sockets."""
    try:
        await stream.send_eof()  # type: ignore[attr-defined]
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        if not (isinstance(cause, OSError) and cause.errno in ALREADY_CLOSED):
            raise


def _half_closes(stream: object) -> bool:
    """*stream* can pass an EOF on (``send_eof``): a half-closeable stream, or a wrapper
    (``.stream``) around one. TLS cannot."""
    for _ in range(8):  # wrappers do not nest deeper than a few levels
        if isinstance(stream, trio.SSLStream):
            return False
        if isinstance(stream, trio.abc.HalfCloseableStream):
            return True
        stream = getattr(stream, "stream", None)
    return False


def _ragged_eof(exc: trio.BrokenResourceError) -> bool:
    """A TLS peer closed its TCP connection without close_notify (common, and harmless where
    the payload frames itself)."""
    return isinstance(exc.__cause__, ssl.SSLEOFError)


async def relay(
    client: trio.abc.Stream,
    upstream: trio.abc.Stream,
    counters: Counters,
    engine: Engine,
    idle_timeout: float,
    throttles: Throttles = (None, None),
) -> str:
    """Relay until both directions have seen EOF, the idle timeout passes, or a side fails.

    *throttles* (up, down) hold a direction to a rate (per-user limits). A client stream that
    is not a plain socket, nor an upstream (a ``via`` parent's stream holding early bytes),
    cannot be moved by file descriptor: it goes through :func:`relay_streams`, whatever
    *engine* is.
    Returns how the relay ended, as a close reason (see the module docstring)."""
    if not isinstance(client, trio.SocketStream) or not isinstance(upstream, trio.SocketStream):
        return await relay_streams(client, upstream, counters, idle_timeout, throttles)
    async with trio.open_nursery() as nursery:
        state = _Relay(counters, idle_timeout, nursery, client, upstream)
        # One direction runs in a child task, the other in this one: an idle session costs
        # two parked tasks (this one included), not three.
        nursery.start_soon(engine.pump, client, upstream, state.up, state.stop_up, throttles[0])
        await engine.pump(upstream, client, state.down, state.stop_down, throttles[1])
    return state.result()


async def relay_streams(
    client: trio.abc.Stream,
    upstream: trio.abc.Stream,
    counters: Counters,
    idle_timeout: float,
    throttles: Throttles = (None, None),
) -> str:
    """:func:`relay` for any trio streams (``receive_some``/``send_all``, and ``send_eof``
    where the receiver can half-close): the same counters, throttles, idle deadline and close
    reasons."""
    async with trio.open_nursery() as nursery:
        state = _Relay(counters, idle_timeout, nursery, client, upstream)
        nursery.start_soon(state.pump_stream, client, upstream, "client", throttles[0])
        await state.pump_stream(upstream, client, "target", throttles[1])
    return state.result()


async def relay_session(
    stream: trio.abc.Stream,
    upstream: trio.abc.Stream,
    leftover: bytes,
    session: Session,
    ctx: ServerContext,
) -> None:
    """The relaying phase of CONNECT, BIND and HTTP CONNECT: what the client sent early goes
    first, then both directions flow until they end; how they ended (:func:`relay`: a normal
    end, the idle timeout, or a failure and its side) becomes the close reason."""
    ctx.registry.set_state(session, "relaying")
    if leftover:
        await upstream.send_all(leftover)
        session.counters.bytes_up += len(leftover)
    throttles = ctx.user_limits.throttles(session)
    hub = ctx.hub
    if (hub is not None and hub.running and throttles == (None, None)
            and isinstance(stream, trio.SocketStream) and isinstance(upstream, trio.SocketStream)):
        session.close_reason = await hub.relay(stream, upstream, session.counters,
                                               ctx.config.idle_timeout)
        return
    session.close_reason = await relay(
        stream, upstream, session.counters, ctx.engine, ctx.config.idle_timeout, throttles
    )
