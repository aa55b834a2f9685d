"""Moving one direction of a relay between two sockets, by file descriptor.

Two engines share one shape (:meth:`Engine.pump` moves one direction):

- :class:`SpliceEngine` (Linux): ``splice(2)`` socket -> pipe -> socket, so payload never enters
  Python. A pipe is taken from a small pool only while data flows and given back once drained.
- :class:`CopyEngine` (anywhere): ``readv`` into a pooled buffer, ``write`` out of it. A buffer is
  likewise held only while data flows.

Either way an idle direction holds nothing but its socket and a parked task. Both engines work
on file descriptors with trio's ``wait_readable``/``wait_writable``; an EOF is passed on as a
half-close (``shutdown(SHUT_WR)``). A socket error is handed to the pump's ``stop`` callback,
never raised: :mod:`trisocks.server.relay` decides what it means for the session.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
from collections.abc import Callable

import trio
from trio.lowlevel import checkpoint, wait_readable, wait_writable

from trisocks.throttle import Throttle

__all__ = ["ALREADY_CLOSED", "CopyEngine", "Engine", "SpliceEngine", "make_engine", "new_pipe",
           "write_some"]

CHUNK = 256 * 1024
YIELD_EVERY = 1 << 20
"""Bytes a direction may move without a trio checkpoint while data keeps flowing (a pump that
waits for data checkpoints anyway); bounds how long one busy session holds the loop."""
F_SETPIPE_SZ = 1031
PROBE = CHUNK
"""Splice engine: a burst up to this size is copied, not spliced (see SpliceEngine)."""
ALREADY_CLOSED = (errno.ENOTCONN, errno.EPIPE)
"""``shutdown(SHUT_WR)`` failing so means the receiver closed (or reset) first."""


class Engine:
    """Moves one direction: from ``src`` to ``dst`` until EOF on ``src``.

    :meth:`pump` is what :func:`~trisocks.server.relay.relay` runs for each direction. It is
    the whole of that task (no wrapper around it, so an idle direction costs as few frames as
    possible): at EOF it half-closes ``dst`` and calls ``stop(None)``; a socket error goes to
    ``stop`` instead of being raised."""

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
                if exc.errno not in ALREADY_CLOSED:
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


def write_some(fd: int, view: memoryview) -> int:
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
        sent = write_some(dfd, view)
        if sent < n:
            await _write_rest(dfd, view[sent:])
    return n


def new_pipe(size: int) -> tuple[int, int]:
    """A non-blocking pipe (read end, write end) asked to hold *size* bytes."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, size)
    except OSError:
        pass  # above /proc/sys/fs/pipe-max-size: the default size still works
    return r, w


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

    Each burst starts with one ``readv`` of up to :data:`PROBE` bytes: what fits is copied
    straight through, one read and one write, which costs fewer system calls than a trip
    through a pipe (this is what keeps round-trip latency low). The probe is as large as a
    splice chunk so that a paced burst (a sender's 16-64 KiB ``sendall``, or several of them
    queued while this task waited) leaves in one write: one send to the destination and one
    wake-up of its reader, where a small probe and then a splice made two of each (and most
    of the CPU a burst costs is those sends). Only a burst that fills the probe continues with
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
            pipe = self._free.pop() if self._free else new_pipe(self._chunk)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self.fallback_chunks += 1
            return await self._fallback.drain(sfd, dfd, add, throttle)
        splice, flags, chunk = os.splice, self._FLAGS, self._chunk
        r, w = pipe
        clean = False
        budget = YIELD_EVERY - n  # the probe's bytes count toward the bound too
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
