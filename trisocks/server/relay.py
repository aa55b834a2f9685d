"""The relaying phase: bytes both ways between the client and the target until both have
ended, and how the relay ended, as the session's close reason.

One loop (:func:`relay`) for every session. Each direction is a pump. Between two plain
sockets the server's :class:`~trisocks.server.engines.Engine` moves it by file descriptor
(splice or copy); a client stream that is not a plain socket (TLS, RFC 1961 GSSAPI wrapping,
a wrapper holding bytes already read) cannot be moved so, and goes through ``receive_some`` and
``send_all`` instead (:func:`relay_streams`). Either way one state counts payload bytes (never
TLS or GSS-API wrapping), applies the throttles, keeps the idle deadline and judges the end.

A direction that ends (EOF) is passed on as a half-close and the other direction keeps going.
A failure in either direction ends the whole relay; it is returned, never raised, so it ends
this session only. "client" is the SOCKS client's connection, "target" the one we dialled
(or, for BIND, the peer that connected):

- ``client closed`` / ``target closed``: a normal end, named by the side that finished first.
  Both sides sent EOF; or a half-close could not be passed on because its receiver had closed
  already (``shutdown`` failing with ENOTCONN or EPIPE: everything before it was delivered);
  or a socket failed on a side that had finished: the target after its EOF (it closed and
  refused what still came), the client after its own EOF or once the target's EOF had been
  passed on to it (it had been sent everything there was; a client closing with SO_LINGER 0
  right after its last read resets).
- ``relay: target: <error>``: the target failed before it finished (say, a reset in the middle
  of a response); ``relay: client: <error>``: the client failed (reset) while the target was
  still sending and before it had sent its own EOF; ``relay: <error>`` when no side's socket
  shows the failure. A GSS-API failure on the client stream (a tampered token; its abort has
  been sent) is the client's: ``relay: client: GSS-API: <why>``, finished or not.
- ``idle timeout``.

On a client stream that cannot half-close (TLS) an EOF that would have to be passed on to it
ends the relay instead: the client learns of the target's end when the connection closes. A
TLS EOF without close_notify counts as an EOF.
"""

from __future__ import annotations

import errno
import os
import ssl
from typing import TYPE_CHECKING

import trio
from trio.lowlevel import checkpoint

from trisocks.net import socket_of
from trisocks.server.engines import ALREADY_CLOSED, Engine
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


class _Relay:
    """The state one relay shares between its two directions.

    Plain methods rather than closures: the pumps hold bound methods, which (with the slots)
    keep an idle session a few hundred bytes smaller than four closures and their cells.

    The idle timeout is the deadline of the relay nursery's own cancel scope, so it needs no
    scope of its own. Moving a deadline costs microseconds (trio re-files it), too much per
    chunk; so it moves at most once per ``slack`` seconds, and then to ``idle_timeout + slack``
    ahead: a relay ends between idle_timeout and idle_timeout + slack after its last byte,
    never earlier.
    """

    __slots__ = ("client", "counters", "down_done", "first", "idle_timeout", "next_move",
                 "nursery", "outcome", "pending", "pending_side", "scope", "slack", "target",
                 "up_done")

    def __init__(
        self,
        counters: Counters,
        idle_timeout: float,
        nursery: trio.Nursery,
        client: trio.abc.Stream,
        target: trio.abc.Stream,
    ) -> None:
        now = trio.current_time()
        scope = nursery.cancel_scope
        self.nursery = nursery
        self.counters = counters
        self.client = client
        self.target = target
        self.up_done = False
        """The client's EOF was passed on to the target."""
        self.down_done = False
        """The target's EOF was passed on to the client."""
        self.first: str | None = None
        """The side that finished first: ``client`` or ``target``."""
        self.outcome: str | None = None
        """The close reason, once a failure (or a normal end by a socket error) decided it."""
        self.pending: BaseException | None = None
        """The first failure, until it is judged (:meth:`_decide`)."""
        self.pending_side: str | None = None
        """The side whose stream raised :attr:`pending`, where a stream pump knows it."""
        self.idle_timeout = idle_timeout
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

    # EOF from a socket that is gone (reset) while the other direction has just failed may be
    # that reset, its error taken by the other direction's write: then it is not the peer's
    # EOF. (Once our own EOF has gone to that peer, the connection is simply over.)

    def stop_up(self, exc: BaseException | None) -> None:
        """An engine's client-to-target pump ended: at EOF (None) or by *exc*."""
        if exc is None and (self.pending is None or self.down_done or not _gone(self.client)):
            self._done("client")
        else:
            self._fail(exc or _reset())

    def stop_down(self, exc: BaseException | None) -> None:
        """An engine's target-to-client pump ended: at EOF (None) or by *exc*."""
        if exc is None and (self.pending is None or self.up_done or not _gone(self.target)):
            self._done("target")
        else:
            self._fail(exc or _reset())

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

    def _done(self, side: str) -> None:
        if side == "client":
            self.up_done = True
        else:
            self.down_done = True
        self.first = self.first or side

    def _fail(self, exc: BaseException, side: str | None = None) -> None:
        if self.pending is None or (isinstance(self.pending, trio.ClosedResourceError)
                                    and not isinstance(exc, trio.ClosedResourceError)):
            # A stream closed under us (a GSS-API failure closes its transport) says less
            # than the failure that closed it, which is often a moment behind.
            first_failure = self.pending is None
            self.pending, self.pending_side = exc, side
            if first_failure:
                self.nursery.start_soon(self._decide)

    async def _decide(self) -> None:
        """Judge the first failure, then end the relay. One scheduling pass later: an EOF the
        other direction got at the same moment (the target's, as the client resets right after
        its last read) is seen first, and decides whether the failure is a normal end."""
        await checkpoint()
        self.outcome = self._verdict()
        self.scope.cancel()

    def _verdict(self) -> str:
        exc = self.pending
        if self.pending_side is not None:
            return self._judge_side(self.pending_side, exc)
        if isinstance(exc, OSError):
            return self._judge(exc)
        return "relay: closed"  # trio.ClosedResourceError: a socket closed under us

    def _finished(self, side: str) -> bool:
        return self.up_done or self.down_done if side == "client" else self.down_done

    def _judge(self, exc: OSError) -> str:
        """The close reason for *exc* between sockets: a normal end if every side whose socket
        is gone (reset, timed out) had finished (see the module docstring), else the failure
        and its side."""
        failed = [side for side, stream in (("client", self.client), ("target", self.target))
                  if _gone(stream)]
        if not failed:
            return f"relay: {exc.strerror or exc}"
        for side in failed:
            if not self._finished(side):
                return f"relay: {side}: {exc.strerror or exc}"
        return f"{self.first or failed[0]} closed"

    def _judge_side(self, side: str, exc: BaseException | None) -> str:
        """The close reason for *exc*, raised by *side*'s stream: a socket error on a side
        that had finished is a normal end (as :meth:`_judge`); anything else (GSS-API, TLS,
        a stream closed under us) is a failure of that side."""
        cause = exc.__cause__ if exc is not None and isinstance(exc.__cause__, OSError) else exc
        if _socket_error(cause) and self._finished(side):
            return f"{self.first or side} closed"
        detail = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
        return f"relay: {side}: {detail}"

    def result(self) -> str:
        if self.outcome is not None:
            return self.outcome
        if self.pending is not None:  # the relay ended before its failure was judged
            return self._verdict()
        if self.up_done and self.down_done:
            return f"{self.first} closed"
        return "idle timeout"  # nothing else cancels the relay's own scope without an outcome


def _reset() -> OSError:
    return ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))


def _gone(stream: trio.abc.Stream) -> bool:
    """The socket's connection is over (reset or timed out: no peer any more)."""
    try:
        socket_of(stream).getpeername()
    except OSError:
        return True
    return False


def _socket_error(exc: BaseException | None) -> bool:
    """*exc* is about the connection (a reset, a timeout), not what came over it (TLS)."""
    return isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError)


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
    session.close_reason = await relay(
        stream, upstream, session.counters, ctx.engine, ctx.config.idle_timeout,
        ctx.user_limits.throttles(session),
    )
