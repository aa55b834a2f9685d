"""The server's view of the store: reads from memory, writes behind.

Sessions read the store from the trio loop through synchronous calls (the password hash at
authentication, limits and quota usage at each request, totals for the admin API). A network
round trip to PostgreSQL there would stall every session of the process, and so would an
SQLite write waiting for another process's write lock (up to ``busy_timeout``), so the server
answers them from a :class:`~trisocks.store.Snapshot` of either backend instead, and writes
from worker threads.

Invariants:

1. Reads never block: they answer from the snapshot.
2. A write is applied to the snapshot at once (an instance sees its own writes) and queued.
   :meth:`CachedStore.sync` sends the queue in order from a worker thread, reloads the snapshot,
   and re-applies what was queued meanwhile, so a reload never hides a local write.
3. A write PostgreSQL refuses on its merits (another instance took that user name a moment
   earlier: :class:`StoreError`) is logged and dropped; one that fails for the connection stays
   queued, in order, for the next sync.
4. Other instances' writes arrive with their NOTIFY (:meth:`CachedStore.refresh_soon`), or at
   the latest after ``refresh_interval``. With SQLite, other processes' writes (``trisocks
   user ...``, other workers' accounting) are seen by ``PRAGMA data_version``, checked every
   ``Store.REFRESH_INTERVAL`` (0.5 s) from a worker thread; the snapshot is reloaded only
   when it changed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypeAlias

import attrs
import trio

from trisocks.policy.quotas import UserLimits, period_starts
from trisocks.store.records import (
    Snapshot,
    StoreError,
    UsageDelta,
    UserUsage,
    is_external,
    validate_username,
)
from trisocks.store.sqlite import Store

if TYPE_CHECKING:
    from trisocks.store.postgres import PostgresStore

Backend: TypeAlias = "PostgresStore | Store"

__all__ = ["CachedStore"]

log = logging.getLogger("trisocks.fleet")

REFRESH_INTERVAL: float | None = None
"""Seconds between reloads when no notification asked for one: ``None`` for the backend's
(``REFRESH_INTERVAL`` of :class:`~trisocks.store.sqlite.Store`, of
:class:`~trisocks.store.postgres.PostgresStore`)."""


@attrs.frozen
class _Write:
    what: str
    local: Callable[[Snapshot], None]
    remote: Callable[[Backend], None]


def _month_start() -> str:
    return period_starts(time.time())[1]


class CachedStore:
    """A :class:`~trisocks.store.postgres.PostgresStore` or :class:`~trisocks.store.sqlite.Store`
    behind a snapshot (module docstring).

    Its reads and writes are those of :class:`trisocks.store.sqlite.Store`; :meth:`run` must run in
    the server's trio loop for writes to leave and others' writes to arrive.
    """

    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self._transient = backend.TRANSIENT_ERRORS
        self._snapshot = backend.snapshot(_month_start())
        self._queue: list[_Write] = []
        self._wanted = trio.Event()
        self._limiter = trio.CapacityLimiter(1)
        self._syncing = trio.Lock()
        """One thread at a time on the backend (an SQLite connection is not thread-safe)."""
        self._kind = "SQLite" if isinstance(backend, Store) else "PostgreSQL"

    def close(self) -> None:
        """Send what is still queued (blocking: the trio loop has ended), then disconnect."""
        sent = self._send(self._queue)
        if sent < len(self._queue):
            log.error("%d store writes could not be sent to %s and are lost",
                      len(self._queue) - sent, self._kind)
        self.backend.close()

    # --- reads -----------------------------------------------------------------------------

    def password_hash(self, name: str) -> str | None:
        return self._snapshot.passwords.get(name)

    def users(self) -> list[str]:
        return sorted(self._snapshot.passwords)

    def has_user(self, name: str) -> bool:
        return name in self._snapshot.passwords

    def user_limits(self, name: str) -> UserLimits:
        return self._snapshot.limits.get(name, UserLimits())

    def bytes_since(self, user: str, day: str) -> int:
        return sum(n for d, n in self._snapshot.daily.get(user, {}).items() if d >= day)

    def usage(self, name: str | None = None) -> list[UserUsage]:
        return sorted((u for u in self._snapshot.usage.values() if name in (None, u.user)),
                      key=lambda u: u.user)

    # --- writes ----------------------------------------------------------------------------

    def add_user(self, name: str, password_hash: str) -> None:
        validate_username(name)
        if self.has_user(name):
            raise StoreError(f"user {name!r} already exists")

        def local(s: Snapshot) -> None:
            _forget(s, name)
            s.passwords[name] = password_hash
            s.usage[name] = UserUsage(name, 0, 0, 0, 0, 0, None)

        self._queue_write(f"add user {name!r}", local,
                          lambda b: b.add_user(name, password_hash))

    def set_password(self, name: str, password_hash: str) -> None:
        self._require(name)
        self._queue_write(f"password of {name!r}",
                          lambda s: s.passwords.__setitem__(name, password_hash),
                          lambda b: b.set_password(name, password_hash))

    def remove_user(self, name: str) -> None:
        self._require(name)
        self._queue_write(f"remove user {name!r}", lambda s: _forget(s, name),
                          lambda b: b.remove_user(name))

    def set_user_limits(self, name: str, limits: UserLimits) -> None:
        if not is_external(name):  # an external identity's limits need no users row
            self._require(name)
        self._queue_write(f"limits of {name!r}",
                          lambda s: s.limits.__setitem__(name, limits),
                          lambda b: b.set_user_limits(name, limits))

    def add_usage(self, deltas: Iterable[tuple[str, UsageDelta]]) -> None:
        deltas = list(deltas)
        if not deltas:
            return
        day, _ = period_starts(time.time())

        def local(s: Snapshot) -> None:
            for user, d in deltas:
                u = s.usage.get(user) or UserUsage(user, 0, 0, 0, 0, 0, None)
                s.usage[user] = UserUsage(
                    user, u.sessions_total + d.sessions, u.bytes_up + d.bytes_up,
                    u.bytes_down + d.bytes_down, u.datagrams_up + d.datagrams_up,
                    u.datagrams_down + d.datagrams_down,
                    max(u.last_seen or 0, d.last_seen or 0) or None,
                )
                days = s.daily.setdefault(user, {})
                days[day] = days.get(day, 0) + d.bytes_up + d.bytes_down

        self._queue_write("usage", local, lambda b: b.add_usage(deltas))

    def _require(self, name: str) -> None:
        if not self.has_user(name):
            raise StoreError(f"no user {name!r}")

    def _queue_write(self, what: str, local: Callable[[Snapshot], None],
                     remote: Callable[[Backend], None]) -> None:
        local(self._snapshot)
        self._queue.append(_Write(what, local, remote))
        self.refresh_soon()

    # --- synchronisation -------------------------------------------------------------------

    def refresh_soon(self) -> None:
        """Sync now (a local write is queued, or another instance announced one)."""
        self._wanted.set()

    async def run(self, refresh_interval: float | None = REFRESH_INTERVAL) -> None:
        """Sync whenever asked to, and every *refresh_interval* seconds, until cancelled."""
        interval = refresh_interval or self.backend.REFRESH_INTERVAL
        while True:
            with trio.move_on_after(interval):
                await self._wanted.wait()
            self._wanted = trio.Event()
            try:
                await self.sync()
            except self._transient as exc:
                log.warning("store: reload failed (%s); serving the last snapshot", exc)

    async def sync(self) -> None:
        """Send the queued writes, then reload the snapshot (invariant 2) if the store may
        have changed since the last one. One sync at a time: two would send a write twice."""
        async with self._syncing:
            await self._sync()

    async def _sync(self) -> None:
        queued = list(self._queue)
        sent = await trio.to_thread.run_sync(self._send, queued, limiter=self._limiter)
        del self._queue[:sent]
        if not sent and not await trio.to_thread.run_sync(self.backend.changed,
                                                          limiter=self._limiter):
            return
        snapshot = await trio.to_thread.run_sync(self.backend.snapshot, _month_start(),
                                                 limiter=self._limiter)
        for write in self._queue:
            write.local(snapshot)
        self._snapshot = snapshot

    def _send(self, writes: list[_Write]) -> int:
        """Send *writes* in order (in a worker thread); return how many are done with."""
        for done, write in enumerate(writes):
            try:
                write.remote(self.backend)
            except StoreError as exc:  # invariant 3: refused on its merits, never retried
                log.warning("%s store: %s refused: %s", self._kind, write.what, exc)
            except self._transient as exc:
                log.warning("%s store: %s not sent yet (%s); will retry", self._kind,
                            write.what, exc)
                return done
        return len(writes)


def _forget(s: Snapshot, name: str) -> None:
    for table in (s.passwords, s.limits, s.usage, s.daily):
        table.pop(name, None)
