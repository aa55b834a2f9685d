"""Moving bytes between two connected sockets, both directions, until both have ended.

Two engines share one shape (:meth:`Engine.pump` moves one direction):

- :class:`SpliceEngine` (Linux): ``splice(2)`` socket -> pipe -> socket, so payload never enters
  Python. A pipe is taken from a small pool only while data flows and given back once drained.
- :class:`CopyEngine` (anywhere): ``readv`` into a pooled buffer, ``write`` out of it. A buffer is
  likewise held only while data flows.

Either way an idle session holds nothing but its two sockets and two parked tasks. Both engines
work on file descriptors with trio's ``wait_readable``/``wait_writable``; a direction that ends
(EOF) is passed on as a half-close (``shutdown(SHUT_WR)``) and the other direction keeps going.
A socket error in either direction ends the whole relay; it is returned, never raised, so it
ends this session only.

How a relay ended (:func:`relay` returns it as the session's close reason) tells normal ends
from failures; "client" is the SOCKS client's socket, "target" the one we dialled (or, for
BIND, the peer that connected):

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
  shows the failure.
- ``idle timeout``.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import ssl
import sys
from collections.abc import Callable

import trio
from trio.lowlevel import checkpoint, wait_readable, wait_writable

from trisocks.sessions import Counters
from trisocks.throttle import Throttle

__all__ = ["CopyEngine", "Engine", "SpliceEngine", "make_engine", "relay", "relay_streams"]

CHUNK = 256 * 1024
YIELD_EVERY = 1 << 20
"""Bytes a direction may move without a trio checkpoint while data keeps flowing (a pump that
waits for data checkpoints anyway); bounds how long one busy session holds the loop."""
F_SETPIPE_SZ = 1031
IDLE_SLACK = 1.0
"""Seconds by which a relay's idle timeout may be late (see :func:`relay`)."""
PROBE = 8 * 1024
"""Splice engine: a burst up to this size is copied, not spliced (see SpliceEngine)."""
_ALREADY_CLOSED = (errno.ENOTCONN, errno.EPIPE)
"""``shutdown(SHUT_WR)`` failing so means the receiver closed (or reset) first."""



class Engine:
    """Moves one direction: from ``src`` to ``dst`` until EOF on ``src``.

    :meth:`pump` is what :func:`relay` runs for each direction. It is the whole of that task
    (no wrapper around it, so an idle direction costs as few frames as possible): at EOF it
    half-closes ``dst`` and calls ``stop(None)``; a socket error goes to ``stop`` instead of
    being raised."""

    name = "abstract"

    async def pump(
        self,
        src: trio.SocketStream,
        dst: trio.SocketStream,
        add: Callable[[int], None],
        stop: Callable[[BaseException | None], None],
        throttle: Throttle | None = None,
    ) -> None:
        sfd, dfd = src.socket.fileno(), dst.socket.fileno()
        try:
            while True:
                await wait_readable(sfd)
                if not await self.drain(sfd, dfd, add, throttle):
                    break
            try:
                dst.socket.shutdown(socket.SHUT_WR)  # EOF passed on: a half-close, not a close
            except OSError as exc:
                if exc.errno not in _ALREADY_CLOSED:
                    raise
                # dst's peer closed before our EOF reached it, after all our bytes: an end
        except (OSError, trio.ClosedResourceError) as exc:
            stop(exc)
        else:
            stop(None)

    async def drain(
        self, sfd: int, dfd: int, add: Callable[[int], None], throttle: Throttle | None = None
    ) -> bool:
        """Move what *sfd* has to *dfd*; False at EOF, True once *sfd* has nothing more for
        now. Buffers or pipes are held only inside this call, so a parked pump holds none."""
        raise NotImplementedError

    def close(self) -> None:
        """Release pooled resources (buffers, pipes); the engine stays usable."""


def _write_some(fd: int, view: memoryview) -> int:
    """Write what the socket takes now. This plain call usually takes the whole chunk (on
    loopback and fast links), and then no coroutine is created for the write."""
    try:
        return os.write(fd, view)
    except BlockingIOError:
        return 0


async def _moved(
    n: int, add: Callable[[int], None], throttle: Throttle | None, budget: int
) -> int:
    """After a chunk of *n* bytes: count it, hold to the rate limit, and give the scheduler a
    turn once :data:`YIELD_EVERY` bytes have gone by; returns the budget left."""
    add(n)
    if throttle is not None:
        await throttle(n)
    budget -= n
    if budget > 0:
        return budget
    await checkpoint()
    return YIELD_EVERY


async def _copy_chunk(sfd: int, dfd: int, buf: memoryview) -> int | None:
    """Copy what *sfd* has now (up to ``len(buf)``) to *dfd*: the byte count, 0 at EOF, or
    None when nothing is readable."""
    try:
        n = os.readv(sfd, [buf])
    except BlockingIOError:
        return None
    if n:
        view = buf[:n]
        sent = _write_some(dfd, view)
        if sent < n:
            await _write_rest(dfd, view[sent:])
    return n


async def _write_rest(fd: int, view: memoryview) -> None:
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:
            await wait_writable(fd)


class CopyEngine(Engine):
    """Portable engine: a pooled buffer per active direction."""

    name = "copy"

    def __init__(self, chunk: int = CHUNK, keep: int = 16) -> None:
        self._chunk = chunk
        self._keep = keep
        self._free: list[memoryview] = []

    def _acquire(self) -> memoryview:
        return self._free.pop() if self._free else memoryview(bytearray(self._chunk))

    def _release(self, buf: memoryview) -> None:
        if len(self._free) < self._keep:
            self._free.append(buf)

    def close(self) -> None:
        self._free.clear()

    async def drain(
        self, sfd: int, dfd: int, add: Callable[[int], None], throttle: Throttle | None = None
    ) -> bool:
        buf = self._acquire()
        budget = YIELD_EVERY
        try:
            while True:
                n = await _copy_chunk(sfd, dfd, buf)
                if n is None:
                    return True
                if n == 0:
                    return False
                budget = await _moved(n, add, throttle, budget)
        finally:
            self._release(buf)


class SpliceEngine(Engine):
    """Linux zero-copy engine.

    Each burst starts with one small ``readv`` (:data:`PROBE` bytes): a message that fits is
    copied straight through, which costs fewer system calls than a trip through a pipe (this is
    what keeps round-trip latency low); only a burst larger than that continues with
    ``splice``. Falls back to copying when no pipe can be had (EMFILE)."""

    name = "splice"
    _FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

    def __init__(self, chunk: int = CHUNK, keep: int = 16) -> None:
        self._chunk = chunk
        self._keep = keep
        self._free: list[tuple[int, int]] = []
        self._fallback = CopyEngine(chunk=64 * 1024, keep=2)
        self._probe = CopyEngine(chunk=PROBE, keep=keep)
        self.fallback_chunks = 0
        """Times a direction was drained through a buffer because no pipe could be made
        (EMFILE/ENFILE)."""

    def _new_pipe(self) -> tuple[int, int]:
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, self._chunk)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size: the default size still works
        return r, w

    def _release(self, pipe: tuple[int, int], *, clean: bool) -> None:
        if clean and len(self._free) < self._keep:
            self._free.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def close(self) -> None:
        while self._free:
            self._release(self._free.pop(), clean=False)
        self._fallback.close()
        self._probe.close()

    async def drain(
        self, sfd: int, dfd: int, add: Callable[[int], None], throttle: Throttle | None = None
    ) -> bool:
        buf = self._probe._acquire()
        try:
            n = await _copy_chunk(sfd, dfd, buf)
        finally:
            self._probe._release(buf)
        if n is None:
            return True
        if n == 0:
            return False
        add(n)
        if throttle is not None:
            await throttle(n)
        if n < PROBE:
            return True  # most likely all there was; wait_readable says if more came
        try:
            pipe = self._free.pop() if self._free else self._new_pipe()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self.fallback_chunks += 1
            return await self._fallback.drain(sfd, dfd, add, throttle)
        splice, flags, chunk = os.splice, self._FLAGS, self._chunk
        r, w = pipe
        clean = False
        budget = YIELD_EVERY
        try:
            while True:
                try:
                    n = splice(sfd, w, chunk, flags=flags)
                except BlockingIOError:
                    clean = True
                    return True
                if n == 0:
                    clean = True
                    return False
                left = n
                while left:
                    try:
                        left -= splice(r, dfd, left, flags=flags)
                    except BlockingIOError:
                        await wait_writable(dfd)
                budget = await _moved(n, add, throttle, budget)
        finally:
            self._release(pipe, clean=clean)


def make_engine(name: str) -> Engine:
    """``auto`` picks splice where the kernel has it."""
    if name == "auto":
        name = "splice" if sys.platform == "linux" and hasattr(os, "splice") else "copy"
    return SpliceEngine() if name == "splice" else CopyEngine()


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
                 "nursery", "outcome", "pending", "scope", "slack", "target", "up_done")

    def __init__(
        self,
        counters: Counters,
        idle_timeout: float,
        nursery: trio.Nursery,
        client: trio.SocketStream,
        target: trio.SocketStream,
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
        """The first socket error, until it is judged (:meth:`_decide`)."""
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
        if exc is None and (self.pending is None or self.down_done or not _gone(self.client)):
            self.up_done = True
            self.first = self.first or "client"
        else:
            self._fail(exc or _reset())

    def stop_down(self, exc: BaseException | None) -> None:
        if exc is None and (self.pending is None or self.up_done or not _gone(self.target)):
            self.down_done = True
            self.first = self.first or "target"
        else:
            self._fail(exc or _reset())

    def _fail(self, exc: BaseException) -> None:
        if self.pending is None:
            self.pending = exc
            self.nursery.start_soon(self._decide)

    async def _decide(self) -> None:
        """Judge the first failure, then end the relay. One scheduling pass later: an EOF the
        other direction got at the same moment (the target's, as the client resets right after
        its last read) is seen first, and decides whether the failure is a normal end."""
        await checkpoint()
        exc = self.pending
        if isinstance(exc, OSError):
            self.outcome = self._judge(exc)
        else:  # trio.ClosedResourceError: a socket closed under us
            self.outcome = "relay: closed"
        self.scope.cancel()

    def _judge(self, exc: OSError) -> str:
        """The close reason for *exc*: a normal end if every side whose socket is gone (reset,
        timed out) had finished (see the module docstring), else the failure and its side."""
        finished = {"client": self.up_done or self.down_done, "target": self.down_done}
        failed = [side for side, stream in (("client", self.client), ("target", self.target))
                  if _gone(stream)]
        if not failed:
            return f"relay: {exc.strerror or exc}"
        for side in failed:
            if not finished[side]:
                return f"relay: {side}: {exc.strerror or exc}"
        return f"{self.first or failed[0]} closed"

    def result(self) -> str:
        if self.outcome is not None:
            return self.outcome
        if self.up_done and self.down_done:
            return f"{self.first} closed"
        return "idle timeout"  # nothing else cancels the relay's own scope without an outcome


def _reset() -> OSError:
    return ConnectionResetError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))


def _gone(stream: trio.SocketStream) -> bool:
    """The socket's connection is over (reset or timed out: no peer any more)."""
    try:
        stream.socket.getpeername()
    except OSError:
        return True
    return False


async def relay(
    client: trio.abc.Stream,
    upstream: trio.SocketStream,
    counters: Counters,
    engine: Engine,
    idle_timeout: float,
    throttles: tuple[Throttle | None, Throttle | None] = (None, None),
) -> str:
    """Relay until both directions have seen EOF, the idle timeout passes, or a socket fails.

    *throttles* (up, down) hold a direction to a rate (per-user limits). A client stream that
    is not a plain socket (TLS, a wrapper holding bytes already read) cannot be moved by file
    descriptor: it goes through :func:`relay_streams`, whatever *engine* is.
    Returns how the relay ended, as a close reason (see the module docstring)."""
    if not isinstance(client, trio.SocketStream):
        return await relay_streams(client, upstream, counters, idle_timeout, throttles)
    async with trio.open_nursery() as nursery:
        state = _Relay(counters, idle_timeout, nursery, client, upstream)
        # One direction runs in a child task, the other in this one: an idle session costs
        # two parked tasks (this one included), not three.
        nursery.start_soon(engine.pump, client, upstream, state.up, state.stop_up, throttles[0])
        await engine.pump(upstream, client, state.down, state.stop_down, throttles[1])
    return state.result()


STREAM_CHUNK = 64 * 1024
""":func:`relay_streams`: bytes asked of ``receive_some`` at a time (TLS records hold 16 KiB)."""


async def relay_streams(
    client: trio.abc.Stream,
    upstream: trio.abc.Stream,
    counters: Counters,
    idle_timeout: float,
    throttles: tuple[Throttle | None, Throttle | None] = (None, None),
) -> str:
    """The copy engine for any trio streams (``receive_some``/``send_all``): what
    :func:`relay` does for a client that is not a plain socket, with the same close reasons.

    An EOF is passed on with ``send_eof`` where the receiver can half-close; one that cannot
    (TLS has no half-close) ends the relay instead: the client learns of the target's end
    when the connection closes. A TLS EOF without close_notify counts as an EOF.
    """
    first: list[str] = []
    failure: list[str] = []
    idle = trio.CancelScope(deadline=trio.current_time() + idle_timeout)

    def up(n: int) -> None:
        counters.bytes_up += n

    def down(n: int) -> None:
        counters.bytes_down += n

    async def pump(
        src: trio.abc.ReceiveStream, dst: trio.abc.SendStream, sides: tuple[str, str],
        add: Callable[[int], None], throttle: Throttle | None,
    ) -> None:
        side = sides[0]
        try:
            while True:
                side = sides[0]
                try:
                    data = await src.receive_some(STREAM_CHUNK)
                except trio.BrokenResourceError as exc:
                    if not _ragged_eof(exc):
                        raise
                    data = b""
                if not data:
                    break
                side = sides[1]
                await dst.send_all(data)
                add(len(data))
                idle.deadline = trio.current_time() + idle_timeout
                if throttle is not None:
                    await throttle(len(data))
            first.append(sides[0])
            side = sides[1]
            if len(first) < 2 and _half_closes(dst):
                await dst.send_eof()  # type: ignore[attr-defined]
            else:  # both ends done, or no half-close: the relay is over
                nursery.cancel_scope.cancel()
        except (OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            cause = exc.__cause__ if isinstance(exc.__cause__, OSError) else exc
            detail = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
            failure.append(f"relay: {side}: {detail}")
            nursery.cancel_scope.cancel()

    with idle:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, client, upstream, ("client", "target"), up, throttles[0])
            nursery.start_soon(pump, upstream, client, ("target", "client"), down, throttles[1])
    if failure:
        return failure[0]
    if idle.cancelled_caught or not first:
        return "idle timeout"
    return f"{first[0]} closed"


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
