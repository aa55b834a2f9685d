"""What the relay hub (:mod:`trisocks.server.hub`) keeps per relay: its two flows (one per
direction), the judging state shared with pump relays, and each socket's place in the set."""

from __future__ import annotations

from typing import Protocol

import trio
from trio.lowlevel import Abort

from trisocks.server.relay_state import RelayState
from trisocks.sessions import Counters

__all__ = ["Carrier", "Flow", "HubRelay", "Socket"]


class Carrier(Protocol):
    """What a relay needs of the hub carrying it."""

    now: float
    """trio's clock at the start of the hub's current round."""

    def decide_later(self, relay: HubRelay) -> None:
        """Judge *relay*'s first failure once the current round is over."""


class Flow:
    """One direction of a relay: from ``sfd`` to ``dfd``."""

    __slots__ = ("dfd", "dst", "ended", "left", "pending", "pipe", "relay", "sfd", "streaming",
                 "up")

    def __init__(self, relay: HubRelay, src: trio.SocketStream, dst: trio.SocketStream,
                 up: bool) -> None:
        self.relay = relay
        self.sfd = src.socket.fileno()
        self.dfd = dst.socket.fileno()
        self.dst = dst.socket
        self.up = up
        """Client to target."""
        self.ended = False
        """EOF passed on, or failed: it reads no more."""
        self.pending: memoryview | None = None
        """Bytes read and not yet taken by the destination (copied)."""
        self.pipe: tuple[int, int] | None = None
        """A pipe holding :attr:`left` bytes not yet taken by the destination (spliced)."""
        self.left = 0
        self.streaming = False
        """Its last round moved more than a bufferful: bulk, which splice moves best."""

    @property
    def blocked(self) -> bool:
        return self.pending is not None or self.pipe is not None

    def wants_read(self) -> bool:
        return not self.ended and not self.blocked


class HubRelay(RelayState):
    """A relay the hub carries: the judging state of :class:`RelayState`, its two flows, and
    the task waiting for its end."""

    __slots__ = ("down_flow", "finished", "hub", "last", "task", "up_flow")

    def __init__(self, hub: Carrier, counters: Counters, idle_timeout: float,
                 client: trio.SocketStream, target: trio.SocketStream) -> None:
        super().__init__(counters, idle_timeout, client, target)
        self.hub = hub
        self.last = trio.current_time()
        """When a byte last moved (the hub's clock of that round)."""
        self.finished = False
        self.task: trio.lowlevel.Task | None = None
        self.up_flow = Flow(self, client, target, True)
        self.down_flow = Flow(self, target, client, False)

    def up(self, n: int) -> None:
        self.counters.bytes_up += n
        self.last = self.hub.now

    def down(self, n: int) -> None:
        self.counters.bytes_down += n
        self.last = self.hub.now

    def _schedule_decision(self) -> None:
        self.hub.decide_later(self)

    def abort(self, _raise_cancel: object) -> Abort:
        self.task = None
        return Abort.SUCCEEDED


class Socket:
    """A relayed socket in the hub's set: the flow reading it and the flow writing to it."""

    __slots__ = ("mask", "reader", "writer")

    def __init__(self, reader: Flow, writer: Flow) -> None:
        self.reader = reader
        self.writer = writer
        self.mask = 0
        """The events it is registered for (0: not in the set)."""
