"""The accountant's flushes: what it keeps when the store fails, and a clean stop."""

from __future__ import annotations

import logging
from collections.abc import Iterable

import pytest
import trio

from trisocks.accounting import Accountant
from trisocks.sessions import SessionRegistry
from trisocks.store import UsageDelta


class BrokenStore:
    """Refuses every write, like a locked or vanished database."""

    def __init__(self) -> None:
        self.tries = 0

    def add_usage(self, deltas: Iterable[tuple[str, UsageDelta]]) -> None:
        self.tries += 1
        raise OSError("disk gone")


async def test_a_failed_last_flush_is_logged_not_raised(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture
) -> None:
    registry = SessionRegistry()
    store = BrokenStore()
    accountant = Accountant(store, registry)  # type: ignore[arg-type]
    with registry.track("127.0.0.1:1") as session:
        session.user, session.command = "alice", "CONNECT"
        session.counters.bytes_up = 10
    async with trio.open_nursery() as nursery:
        nursery.start_soon(accountant.run, 2.0)
        await trio.sleep(5)  # two periodic flushes fail and are retried
        nursery.cancel_scope.cancel()  # the server stopping: must not raise out of here
    assert store.tries == 3
    assert accountant.unflushed_bytes("alice") == 10  # kept, not dropped
    assert "accounting: usage since the last flush is lost" in caplog.text
    assert [r.levelno for r in caplog.records].count(logging.ERROR) == 4  # 3 flushes + lost
