"""The relay hub: the relaying phase of every plain-socket session of the process, in one task.

A session between two plain sockets with no throttle (most sessions) is relayed here rather
than by two pump tasks (:func:`trisocks.server.relay.relay`). The hub keeps its own
level-triggered epoll set holding every relayed socket, and trio watches that one descriptor:
one wake-up of the hub serves every socket that became ready meanwhile, a system call or two per
socket and no task switch, where a pump pays a pass of the scheduler and an ``epoll_ctl`` per
wake-up. The session's own task parks until its relay ends, which costs no scope, no nursery and
no second task; an idle session holds that parked task, its sockets' places in the set and a
small state. Cancelling the session's scope (a kill, the lifetime, shutdown) still ends it at
once: parking is cancellable, and the cancelled task takes its sockets out of the set.

Per direction (a :class:`Flow`: client to target, target to client) a wake-up moves what the
source has, up to :data:`BUDGET` bytes (the rest is reported again on the next round, so one busy
session cannot hold the loop): a read into the hub's one buffer and a write, and for a burst
that fills the buffer, ``splice`` through a pipe. What the destination does not take at once
stays pending (the bytes, or the pipe holding them): that direction stops reading until the
destination is writable again (backpressure). An EOF is passed on as a half-close. How a relay
ended is judged as for pumps (:class:`~trisocks.server.relay.RelayState`), and a failure is
judged after the round it happened in, so an EOF the other direction got at the same moment is
seen first.

Idle timeouts are kept by one sweeper task for all relays (:mod:`trisocks.server.idle_sweep`),
not by a scope per session.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
from typing import TYPE_CHECKING

import outcome
import trio
from trio.lowlevel import current_task, reschedule, wait_readable, wait_task_rescheduled

from trisocks.server.engines import ALREADY_CLOSED, new_pipe, write_some
from trisocks.server.hub_state import Flow, HubRelay, Socket
from trisocks.server.idle_sweep import IdleSweeper

if TYPE_CHECKING:
    from trisocks.sessions import Counters

__all__ = ["Hub"]

log = logging.getLogger("trisocks.relay")

BUFFER = 64 * 1024
"""The hub's one copy buffer: a read that fills it continues by ``splice`` (splice engine)."""
PIPE = 256 * 1024
BUDGET = 1 << 20
"""Bytes one direction may move per round of the hub."""
ROUND_BUDGET = 4 << 20
"""Bytes one round may move in all before the hub gives the other tasks a turn."""
EVENTS = 256
_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)


class Hub:
    """Relays plain-socket sessions by readiness, in one task (module docstring). *splice*:
    move bursts with ``splice(2)`` (the splice engine) rather than through the buffer."""

    def __init__(self, *, splice: bool = True) -> None:
        self._epoll: select.epoll = None  # type: ignore[assignment]  # while run() runs
        self._socks: dict[int, Socket] = {}
        self._relays: set[HubRelay] = set()
        self._deciding: list[HubRelay] = []
        self._buf = memoryview(bytearray(BUFFER))
        self._pipes: list[tuple[int, int]] = []
        self._splice = splice and hasattr(os, "splice")
        self._sweeper = IdleSweeper(self._relays, self._finish)  # type: ignore[arg-type]
        self.now = 0.0
        """trio's clock at the start of the current round."""
        self.running = False
        """Serving relays (:meth:`run` is on): :meth:`relay` may be used."""
        self.fallback_chunks = 0
        """Bursts copied through the buffer because no pipe could be made (EMFILE/ENFILE)."""

    def __len__(self) -> int:
        return len(self._relays)

    def decide_later(self, relay: HubRelay) -> None:
        self._deciding.append(relay)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Carry relays until cancelled; relays still here then end as ``relay: closed``.
        The epoll set and the pooled pipes exist only while it runs."""
        self._epoll = select.epoll()
        self.running = True
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._sweeper.run)
                task_status.started()
                await self._serve()
        finally:
            self.running = False
            for relay in list(self._relays):
                relay.outcome = relay.outcome or "relay: closed"
                self._finish(relay)
            self.drop_pipes()
            self._epoll.close()

    async def relay(self, client: trio.SocketStream, target: trio.SocketStream,
                    counters: Counters, idle_timeout: float) -> str:
        """Relay between *client* and *target* until both have ended, the idle timeout passes
        or a side fails; return how it ended (the close reasons of
        :mod:`trisocks.server.relay`). Cancellation ends it at once."""
        relay = HubRelay(self, counters, idle_timeout, client, target)
        self._relays.add(relay)
        self._socks[relay.up_flow.sfd] = Socket(relay.up_flow, relay.down_flow)
        self._socks[relay.down_flow.sfd] = Socket(relay.down_flow, relay.up_flow)
        try:
            self._update(relay.up_flow.sfd)
            self._update(relay.down_flow.sfd)
        except OSError as exc:  # not a socket epoll takes (closed under us)
            relay.pending = exc
            relay.outcome = relay._verdict()
            self._finish(relay)
        self._sweeper.plan(relay.last + idle_timeout)
        try:
            if not relay.finished:
                relay.task = current_task()
                await wait_task_rescheduled(relay.abort)
        finally:
            if not relay.finished:  # cancelled: a kill, the lifetime, shutdown
                self._finish(relay)
        return relay.result()

    # -- the round -----------------------------------------------------------------------------

    async def _serve(self) -> None:
        poll, socks, fd = self._epoll.poll, self._socks, self._epoll.fileno()
        while True:
            await wait_readable(fd)
            self.now = trio.current_time()
            budget = ROUND_BUDGET
            for sfd, events in poll(0, EVENTS):
                sock = socks.get(sfd)
                if sock is None:
                    continue
                try:
                    if events & ~_IN and sock.writer.blocked:
                        self._flush(sock.writer)
                    if events & ~_OUT and sock.reader.wants_read():
                        budget -= self._move(sock.reader)
                except Exception as exc:  # a bug must end this relay only, not the hub
                    log.exception("relay hub: internal error")
                    relay = sock.reader.relay
                    relay.outcome = f"internal error: {type(exc).__name__}: {exc}"
                    self._finish(relay)
                if budget <= 0:
                    break
            while self._deciding:
                relay = self._deciding.pop()
                if relay.finished:
                    continue
                for flow in (relay.up_flow, relay.down_flow):  # an EOF at the same moment
                    if flow.wants_read():
                        self._move(flow)
                if not relay.finished:
                    relay.outcome = relay._verdict()
                    self._finish(relay)

    def _move(self, flow: Flow) -> int:
        """Move what *flow*'s source has (up to :data:`BUDGET`); return the bytes moved. A
        burst that fills the buffer goes on by splice (splice engine)."""
        if not self._splice:
            return self._copy(flow, BUDGET)
        if flow.streaming:  # the last round filled the buffer: splice straight away
            moved = self._splice_more(flow, BUDGET)
            flow.streaming = moved >= BUFFER
            return moved
        moved = self._copy(flow, BUFFER)
        if moved == BUFFER and flow.wants_read():
            moved += self._splice_more(flow, BUDGET - moved)
            flow.streaming = moved >= 2 * BUFFER
        return moved

    def _copy(self, flow: Flow, budget: int) -> int:
        """Move through the buffer until the source has less than a bufferful (level-triggered:
        the set says if more came), *budget* bytes have gone, or the flow blocks or ends."""
        moved, buf = 0, self._buf
        add = flow.relay.up if flow.up else flow.relay.down
        while moved < budget:
            try:
                n = os.readv(flow.sfd, [buf])
                if n == 0:
                    self._eof(flow)
                    break
                sent = write_some(flow.dfd, buf[:n])
            except BlockingIOError:
                break
            except OSError as exc:
                self._stop(flow, exc)
                break
            add(n)
            moved += n
            if sent < n:
                flow.pending = memoryview(bytes(buf[sent:n]))
                self._block(flow)
                break
            if n < BUFFER:
                break
        return moved

    def _splice_more(self, flow: Flow, budget: int) -> int:
        try:
            pipe = self._pipes.pop() if self._pipes else new_pipe(PIPE)
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE):
                raise
            self.fallback_chunks += 1
            return self._copy(flow, budget)  # no pipe to be had: through the buffer
        r, w = pipe
        add = flow.relay.up if flow.up else flow.relay.down
        moved = 0
        clean = True
        try:
            while moved < budget:
                try:
                    n = os.splice(flow.sfd, w, PIPE, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    break
                if n == 0:
                    self._eof(flow)
                    break
                add(n)
                moved += n
                left = n
                while left:
                    try:
                        left -= os.splice(r, flow.dfd, left, flags=_SPLICE_FLAGS)
                    except BlockingIOError:
                        flow.pipe, flow.left = pipe, left  # the flow holds it till it drains
                        self._block(flow)
                        return moved
        except OSError as exc:
            clean = False
            self._stop(flow, exc)
        self._release(pipe, clean)
        return moved

    def _flush(self, flow: Flow) -> None:
        """The destination of a blocked *flow* can take more: give it what is pending."""
        try:
            if flow.pending is not None:
                sent = write_some(flow.dfd, flow.pending)
                rest = flow.pending[sent:]
                flow.pending = rest if rest else None
            elif flow.pipe is not None:
                while flow.left:
                    flow.left -= os.splice(flow.pipe[0], flow.dfd, flow.left,
                                           flags=_SPLICE_FLAGS)
                self._release(flow.pipe, True)
                flow.pipe = None
        except BlockingIOError:
            return
        except OSError as exc:
            self._stop(flow, exc)
            return
        if not flow.blocked:
            self._update(flow.sfd)
            self._update(flow.dfd)

    def _block(self, flow: Flow) -> None:
        self._update(flow.sfd)
        self._update(flow.dfd)

    def _eof(self, flow: Flow) -> None:
        """EOF from *flow*'s source: pass it on as a half-close."""
        try:
            flow.dst.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno not in ALREADY_CLOSED:
                self._stop(flow, exc)
                return
        self._stop(flow, None)

    def _stop(self, flow: Flow, exc: BaseException | None) -> None:
        """*flow* ended: at EOF (None) or by *exc*; the relay judges what that means."""
        relay = flow.relay
        if flow.ended:
            return
        flow.ended = True
        self._release_flow(flow)
        if relay.finished:
            return
        if flow.up:
            relay.stop_up(exc)
        else:
            relay.stop_down(exc)
        if relay.finished:
            return
        if relay.up_done and relay.down_done:
            self._finish(relay)
            return
        try:
            self._update(flow.sfd)
            self._update(flow.dfd)
        except OSError:
            pass

    # -- the set -------------------------------------------------------------------------------

    def _update(self, fd: int) -> None:
        """Register *fd* for what its flows want now (none: out of the set, for an epoll set
        reports a hang-up whatever it was asked)."""
        sock = self._socks.get(fd)
        if sock is None:
            return
        mask = (_IN if sock.reader.wants_read() else 0) | (_OUT if sock.writer.blocked else 0)
        if mask == sock.mask:
            return
        if not mask:
            self._epoll.unregister(fd)
        elif sock.mask:
            self._epoll.modify(fd, mask)
        else:
            self._epoll.register(fd, mask)
        sock.mask = mask

    def _finish(self, relay: HubRelay) -> None:
        """*relay* is over: out of the set, pipes back, its task woken."""
        if relay.finished:
            return
        relay.finished = True
        self._relays.discard(relay)
        for flow in (relay.up_flow, relay.down_flow):
            flow.ended = True
            self._release_flow(flow)
            sock = self._socks.get(flow.sfd)
            if sock is not None and sock.reader is flow:  # not a reused fd's new owner
                del self._socks[flow.sfd]
                if sock.mask:
                    try:
                        self._epoll.unregister(flow.sfd)
                    except OSError:  # closed already: the kernel dropped it from the set
                        pass
        task, relay.task = relay.task, None
        if task is not None:
            reschedule(task, outcome.Value(None))

    def _release_flow(self, flow: Flow) -> None:
        flow.pending = None
        if flow.pipe is not None:
            self._release(flow.pipe, False)  # bytes still in it: not for another flow
            flow.pipe = None

    def _release(self, pipe: tuple[int, int], clean: bool) -> None:
        if clean and len(self._pipes) < 16:
            self._pipes.append(pipe)
        else:
            os.close(pipe[0])
            os.close(pipe[1])

    def drop_pipes(self) -> None:
        """Close the pooled pipes (the next burst makes a new one)."""
        while self._pipes:
            self._release(self._pipes.pop(), False)
