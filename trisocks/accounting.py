"""Per-user accounting: live counters folded into the store every few seconds.

A session's counters are taken as differences against what was flushed before, at each
periodic flush, when the session ends, and at shutdown; so a graceful stop loses nothing and a
crash loses at most one flush interval.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import TYPE_CHECKING

import attrs
import trio

from trisocks.policy.quotas import period_starts
from trisocks.sessions import Counters, Session, SessionRegistry
from trisocks.store.records import ANONYMOUS, UsageDelta, UserUsage
from trisocks.store.sqlite import Store

if TYPE_CHECKING:
    from trisocks.store.interface import UserStore

__all__ = ["Accountant"]

log = logging.getLogger("trisocks.accounting")


@attrs.define
class _Pending:
    sessions: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    datagrams_up: int = 0
    datagrams_down: int = 0
    last_seen: float = 0.0


class Accountant:
    """Takes per-user usage from the registry's sessions and adds it to the store."""

    def __init__(self, store: UserStore, registry: SessionRegistry) -> None:
        self.store = store
        self.registry = registry
        self._pending: dict[str, _Pending] = {}
        self._flushes = 0
        """Flushes so far: a read of the store that a flush overlapped is taken again."""
        registry.on_end(self._ended)

    @staticmethod
    def account_name(session: Session) -> str:
        return session.user if session.user is not None else ANONYMOUS

    def _take(self, session: Session, *, new_session: bool = False) -> None:
        c, f = session.counters, session.flushed
        pending = self._pending.setdefault(self.account_name(session), _Pending())
        pending.sessions += new_session
        pending.bytes_up += c.bytes_up - f.bytes_up
        pending.bytes_down += c.bytes_down - f.bytes_down
        pending.datagrams_up += c.datagrams_up - f.datagrams_up
        pending.datagrams_down += c.datagrams_down - f.datagrams_down
        pending.last_seen = time.time()
        session.flushed = attrs.evolve(c)

    def _ended(self, session: Session) -> None:
        # A session is counted once it has a user (or is known to be anonymous): when its
        # request has been read. Sessions that never got past the handshake are not usage.
        if session.command is not None:
            self._take(session, new_session=True)

    def flush(self) -> None:
        """Write everything counted so far into the store."""
        for session in self.registry:
            if session.command is not None:
                self._take(session)
        pending, self._pending = self._pending, {}
        self._flushes += 1
        deltas = [
            (user, UsageDelta(p.sessions, p.bytes_up, p.bytes_down, p.datagrams_up,
                              p.datagrams_down, p.last_seen))
            for user, p in pending.items()
            if p.sessions or p.bytes_up or p.bytes_down or p.datagrams_up or p.datagrams_down
        ]
        try:
            self.store.add_usage(deltas)
        except Exception:
            log.exception("accounting flush failed; will retry")
            for user, p in pending.items():  # keep it for the next try
                into = self._pending.setdefault(user, _Pending())
                for field in attrs.fields(_Pending):
                    merge = max if field.name == "last_seen" else sum
                    pair = (getattr(into, field.name), getattr(p, field.name))
                    setattr(into, field.name, merge(pair))
            raise

    async def run(self, interval: float) -> None:
        """Flush every *interval* seconds until cancelled, then once more.

        Error handling: a failed flush is logged and retried at the next one; a failed last
        flush is logged too, and not raised: it would turn the server's orderly stop into a
        crash (an exception out of the root nursery) without saving anything more.
        """
        try:
            while True:
                await trio.sleep(interval)
                with contextlib.suppress(Exception):  # logged in flush; retried next time
                    self.flush()
        finally:
            try:
                self.flush()
            except Exception:  # logged in flush
                log.error("accounting: usage since the last flush is lost")

    def unflushed_bytes(self, name: str) -> int:
        """Payload bytes of *name* (both directions) not in the store yet: pending for the
        next flush plus what its live sessions moved since their last flush."""
        p = self._pending.get(name, _Pending())
        total = p.bytes_up + p.bytes_down
        for session in self.registry:
            if session.user == name:
                c, f = session.counters, session.flushed
                total += c.bytes_up - f.bytes_up + c.bytes_down - f.bytes_down
        return total

    def period_usage(self, name: str, now: float) -> tuple[int, int]:
        """Bytes *name* moved today and this month (UTC), what is not flushed yet included: what
        quotas count (:func:`trisocks.policy.quotas.quota_exceeded`)."""
        day, month = period_starts(now)
        unflushed = self.unflushed_bytes(name)
        return (self.store.bytes_since(name, day) + unflushed,
                self.store.bytes_since(name, month) + unflushed)

    async def read_all(self) -> tuple[list[UserUsage], list[str]]:
        """Every user's persisted totals and every user name, read off the trio loop from
        SQLite (the server's cached store answers from memory). For :meth:`live_usage`'s
        *persisted*: a flush that lands during the read would be counted in neither the
        rows nor what is pending, so the read is taken again then."""
        store = self.store
        if not isinstance(store, Store):
            return store.usage(), store.users()
        while True:
            flushes = self._flushes
            result = await trio.to_thread.run_sync(store.read_all)
            if flushes == self._flushes:
                return result

    def live_usage(
        self, name: str | None = None, *, persisted: list[UserUsage] | None = None
    ) -> list[dict[str, object]]:
        """Persisted totals plus what is pending and what live sessions have moved.

        Args:
            name: one user's row only (an indexed lookup), or every user's.
            persisted: the store's rows, read beforehand by :meth:`read_all` (for every user:
                too slow for the trio loop); ``None`` reads them here.
        """
        if persisted is None:
            persisted = self.store.usage(name)
        rows: dict[str, UserUsage] = {u.user: u for u in persisted}
        extra: dict[str, Counters] = {}
        active: dict[str, int] = {}
        for session in self.registry:
            user = self.account_name(session)
            if name is not None and user != name:
                continue
            active[user] = active.get(user, 0) + 1
            c, f = session.counters, session.flushed
            e = extra.setdefault(user, Counters())
            e.bytes_up += c.bytes_up - f.bytes_up
            e.bytes_down += c.bytes_down - f.bytes_down
            e.datagrams_up += c.datagrams_up - f.datagrams_up
            e.datagrams_down += c.datagrams_down - f.datagrams_down
        result = []
        names = set(rows) | set(active) | {u for u in self._pending if name in (None, u)}
        for user in sorted(names):
            base = rows.get(user) or UserUsage(user, 0, 0, 0, 0, 0, None)
            p = self._pending.get(user, _Pending())
            e = extra.get(user, Counters())
            last_seen = max(base.last_seen or 0, p.last_seen, time.time() if user in active else 0)
            result.append({
                "user": user,
                "active_sessions": active.get(user, 0),
                # running sessions count too: they are added to the store when they end
                "sessions_total": base.sessions_total + p.sessions + active.get(user, 0),
                "bytes_up": base.bytes_up + p.bytes_up + e.bytes_up,
                "bytes_down": base.bytes_down + p.bytes_down + e.bytes_down,
                "datagrams_up": base.datagrams_up + p.datagrams_up + e.datagrams_up,
                "datagrams_down": base.datagrams_down + p.datagrams_down + e.datagrams_down,
                "last_seen": last_seen or None,
            })
        return result
