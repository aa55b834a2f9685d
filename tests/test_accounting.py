"""The accountant's flushes: what it keeps when the store fails, and a clean stop."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from pathlib import Path

import pytest
import trio

from trisocks.accounting import Accountant
from trisocks.protocol import Address, Command
from trisocks.sessions import SessionRegistry
from trisocks.store.records import UsageDelta, UserUsage
from trisocks.store.sqlite import Store


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
    with registry.track(Address.of("127.0.0.1", 1)) as session:
        session.user, session.command = "alice", Command.CONNECT
        session.counters.bytes_up = 10
    async with trio.open_nursery() as nursery:
        nursery.start_soon(accountant.run, 2.0)
        await trio.sleep(5)  # two periodic flushes fail and are retried
        nursery.cancel_scope.cancel()  # the server stopping: must not raise out of here
    assert store.tries == 3
    assert accountant.unflushed_bytes("alice") == 10  # kept, not dropped
    assert "accounting: usage since the last flush is lost" in caplog.text
    assert [r.levelno for r in caplog.records].count(logging.ERROR) == 4  # 3 flushes + lost


async def test_reading_every_user_runs_off_the_loop_and_survives_a_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(tmp_path / "t.db")
    store.add_user("alice", "hash")
    registry = SessionRegistry()
    accountant = Accountant(store, registry)
    loop_thread = threading.get_ident()
    reads: list[int] = []
    read_all = Store.read_all

    def read_in_thread(self: Store) -> tuple[list[UserUsage], list[str]]:
        reads.append(threading.get_ident())
        result = read_all(self)
        if len(reads) == 1:  # a flush lands while the first read is under way
            trio.from_thread.run_sync(accountant.flush)
        return result

    monkeypatch.setattr(Store, "read_all", read_in_thread)
    with registry.track(Address.of("127.0.0.1", 1)) as session:
        session.user, session.command = "alice", Command.CONNECT
        session.counters.bytes_up = 100
        persisted, names = await accountant.read_all()
        (row,) = accountant.live_usage(persisted=persisted)
    assert names == ["alice"] and row["bytes_up"] == 100  # counted once, not lost
    assert len(reads) == 2 and loop_thread not in reads  # read again, never on the loop
    store.close()
