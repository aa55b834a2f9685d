"""The server's view of the PostgreSQL store: reads from memory, writes behind.

Sessions read the store from the trio loop through synchronous calls (the password hash at
authentication, limits and quota usage at each request, totals for the admin API) that the
SQLite store answers in microseconds. A network round trip there would stall every session of
the process, so with PostgreSQL the server answers them from a :class:`Snapshot` instead.

Invariants:

1. Reads never block: they answer from the snapshot.
2. A write is applied to the snapshot at once (an instance sees its own writes) and queued.
   :meth:`CachedStore.sync` sends the queue in order from a worker thread, reloads the snapshot,
   and re-applies what was queued meanwhile, so a reload never hides a local write.
3. A write PostgreSQL refuses on its merits (another instance took that user name a moment
   earlier: :class:`StoreError`) is logged and dropped; one that fails for the connection stays
   queued, in order, for the next sync.
4. Other instances' writes arrive with their NOTIFY (:meth:`CachedStore.refresh_soon`), or at
   the latest after ``refresh_interval``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import attrs
import psycopg
import psycopg_pool
import trio

from trisocks.fleet.postgres import PostgresStore, Snapshot
from trisocks.policy.quotas import UserLimits, period_starts
from trisocks.store import StoreError, UsageDelta, UserUsage, validate_username

__all__ = ["CachedStore"]

log = logging.getLogger("trisocks.fleet")

REFRESH_INTERVAL = 5.0
"""Seconds between reloads when no notification asked for one."""


@attrs.frozen
class _Write:
    what: str
    local: Callable[[Snapshot], None]
    remote: Callable[[PostgresStore], None]


def _month_start() -> str:
    return period_starts(time.time())[1]


class CachedStore:
    """A :class:`~trisocks.fleet.postgres.PostgresStore` behind a snapshot (module docstring).

    Its reads and writes are those of :class:`trisocks.store.Store`; :meth:`run` must run in
    the server's trio loop for writes to leave and others' writes to arrive.
    """

    def __init__(self, backend: PostgresStore) -> None:
        self.backend = backend
        self._snapshot = backend.snapshot(_month_start())
        self._queue: list[_Write] = []
        self._wanted = trio.Event()

    def close(self) -> None:
        """Send what is still queued (blocking: the trio loop has ended), then disconnect."""
        sent = self._send(self._queue)
        if sent < len(self._queue):
            log.error("%d store writes could not be sent to PostgreSQL and are lost",
                      len(self._queue) - sent)
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
                     remote: Callable[[PostgresStore], None]) -> None:
        local(self._snapshot)
        self._queue.append(_Write(what, local, remote))
        self.refresh_soon()

    # --- synchronisation -------------------------------------------------------------------

    def refresh_soon(self) -> None:
        """Sync now (a local write is queued, or another instance announced one)."""
        self._wanted.set()

    async def run(self, refresh_interval: float = REFRESH_INTERVAL) -> None:
        """Sync whenever asked to, and every *refresh_interval* seconds, until cancelled."""
        while True:
            with trio.move_on_after(refresh_interval):
                await self._wanted.wait()
            self._wanted = trio.Event()
            try:
                await self.sync()
            except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                log.warning("PostgreSQL store: reload failed (%s); serving the last snapshot",
                            exc)

    async def sync(self) -> None:
        """Send the queued writes, then reload the snapshot (invariant 2)."""
        queued = list(self._queue)
        sent = await trio.to_thread.run_sync(self._send, queued)
        del self._queue[:sent]
        snapshot = await trio.to_thread.run_sync(self.backend.snapshot, _month_start())
        for write in self._queue:
            write.local(snapshot)
        self._snapshot = snapshot

    def _send(self, writes: list[_Write]) -> int:
        """Send *writes* in order (in a worker thread); return how many are done with."""
        for done, write in enumerate(writes):
            try:
                write.remote(self.backend)
            except StoreError as exc:  # invariant 3: refused on its merits, never retried
                log.warning("PostgreSQL store: %s refused: %s", write.what, exc)
            except (psycopg.Error, psycopg_pool.PoolTimeout) as exc:
                log.warning("PostgreSQL store: %s not sent yet (%s); will retry", write.what, exc)
                return done
        return len(writes)


def _forget(s: Snapshot, name: str) -> None:
    for table in (s.passwords, s.limits, s.usage, s.daily):
        table.pop(name, None)
