"""How a relay ended: the close reasons, judged the same whatever carries the bytes.

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

import trio

from trisocks.net import socket_of
from trisocks.sessions import Counters

__all__ = ["RelayState", "socket_error"]


class RelayState:
    """How a relay is going, shared by its two directions, and how it ended (module
    docstring): which side finished first, the first failure and its verdict. The carrier of
    the bytes (:class:`_Relay`'s pumps, or :class:`~trisocks.server.hub.Hub`) reports each
    direction's end (:meth:`stop_up`, :meth:`stop_down`) and decides a failure one scheduling
    pass after it (:meth:`_schedule_decision`).

    Plain methods rather than closures: the pumps hold bound methods, which (with the slots)
    keep an idle session a few hundred bytes smaller than four closures and their cells.
    """

    __slots__ = ("client", "counters", "down_done", "first", "idle_timeout", "outcome",
                 "pending", "pending_side", "target", "up_done")

    def __init__(
        self,
        counters: Counters,
        idle_timeout: float,
        client: trio.abc.Stream,
        target: trio.abc.Stream,
    ) -> None:
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
        """The first failure, until it is judged (:meth:`_verdict`)."""
        self.pending_side: str | None = None
        """The side whose stream raised :attr:`pending`, where a stream pump knows it."""
        self.idle_timeout = idle_timeout

    def up(self, n: int) -> None:
        raise NotImplementedError

    def down(self, n: int) -> None:
        raise NotImplementedError

    def _schedule_decision(self) -> None:
        """Judge :attr:`pending` soon (after a scheduling pass), then end the relay."""
        raise NotImplementedError


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
                self._schedule_decision()

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
        if socket_error(cause) and self._finished(side):
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


def socket_error(exc: BaseException | None) -> bool:
    """*exc* is about the connection (a reset, a timeout), not what came over it (TLS)."""
    return isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError)
