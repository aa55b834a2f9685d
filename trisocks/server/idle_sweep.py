"""Idle timeouts for many relays with one task (the relay hub's): no scope or timer per relay.

The sweeper wakes at the earliest deadline it knows, ends the relays idle for their
``idle_timeout`` or more, and sleeps again; between sweeps at most once per :data:`SLACK`
seconds (a tenth of a timeout shorter than 10 s), so with thousands of relays a sweep, one pass
over them, runs about once a second. A relay so ends between ``idle_timeout`` and
``idle_timeout`` + slack after its last byte, never earlier.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol

import trio

__all__ = ["SLACK", "IdleSweeper"]

SLACK = 1.0
"""Seconds by which an idle timeout of 10 s or more may be late."""


class Idle(Protocol):
    last: float
    """When a byte last moved."""
    idle_timeout: float


class IdleSweeper:
    """Ends (``expire``) the relays of *relays* that have been idle too long."""

    def __init__(self, relays: Collection[Idle], expire: Callable[[Idle], None]) -> None:
        self._relays = relays
        self._expire = expire
        self._at = float("inf")
        self._scope: trio.CancelScope | None = None

    def plan(self, at: float) -> None:
        """A relay may expire at *at*: sweep by then."""
        if at < self._at:
            self._at = at
            if self._scope is not None:
                self._scope.deadline = at

    async def run(self) -> None:
        while True:
            with trio.CancelScope(deadline=self._at) as self._scope:
                await trio.sleep_forever()
            now = trio.current_time()
            earliest, slack = float("inf"), SLACK
            for relay in list(self._relays):
                expires = relay.last + relay.idle_timeout
                if expires <= now:
                    self._expire(relay)
                else:
                    earliest = min(earliest, expires)
                    slack = min(slack, relay.idle_timeout / 10)
            self._at = max(earliest, now + slack) if earliest != float("inf") else earliest
