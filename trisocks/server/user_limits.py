"""Per-user limits of the sessions past their request: how many at once, quotas at the
request, byte rates while relaying, and lifetime.

Limits are read from the store (``trisocks user limits``, the admin API), the server's config
filling in where a user has none, so changes apply without a restart. A user's token buckets
(:meth:`UserLimiter.throttles`) are shared by all of its sessions and refreshed by the quota
watcher (:class:`trisocks.server.revocation.QuotaWatcher`), which also ends sessions over quota.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import attrs
import trio

from trisocks.accounting import Accountant
from trisocks.policy.limits import Counts, TokenBucket
from trisocks.policy.quotas import UserLimits, quota_exceeded
from trisocks.sessions import Session, SessionRegistry
from trisocks.throttle import Throttle

if TYPE_CHECKING:
    from trisocks.config import Config
    from trisocks.server.stats import Stats
    from trisocks.store.interface import UserStore

__all__ = ["BURST_SECONDS", "UserLimiter"]

BURST_SECONDS = 0.25
"""A user's byte bucket holds this many seconds of its rate."""


@attrs.define(eq=False)
class _UserRate:
    """A user's byte buckets, shared by all of its sessions."""

    up: TokenBucket | None
    down: TokenBucket | None
    sessions: int = 0

    def matches(self, limits: UserLimits) -> bool:
        return (self.up and self.up.rate) == limits.rate_up and (
            self.down and self.down.rate
        ) == limits.rate_down


def _bucket(rate: int | None) -> TokenBucket | None:
    return None if rate is None else TokenBucket(rate, max(1.0, rate * BURST_SECONDS))


class UserLimiter:
    """Slots of each user's session limit, and its byte buckets while it has sessions.

    *config* gives the running config (``max_sessions_per_user``, ``max_session_duration``);
    *store* the users' own limits; *accountant* their usage against quotas; refusals are
    counted in *stats*; *registry* tells when a session ends (its slot is given back).
    """

    def __init__(
        self,
        config: Callable[[], Config],
        store: UserStore,
        accountant: Accountant,
        stats: Stats,
        registry: SessionRegistry,
    ) -> None:
        self._config = config
        self._store = store
        self._accountant = accountant
        self._stats = stats
        self.user_sessions = Counts()
        """Sessions holding a slot, by user."""
        self._rates: dict[str, _UserRate] = {}
        self._open: set[Session] = set()
        """Sessions holding a slot (:meth:`open`)."""
        registry.on_end(self._release)

    def open(self, session: Session) -> str | None:
        """Take a slot of the user's limits for *session* (authenticated), held until
        :meth:`end_request` or the session's end; else why not, for the log (counted in
        ``stats.limited`` under the limit's name)."""
        over = self._take(session)
        if over is None:
            return None
        limit, refusal = over
        self._stats.limited[limit] += 1
        return refusal

    def _take(self, session: Session) -> tuple[str, str] | None:
        """Take the slot; else (the limit's name, why)."""
        user = session.user
        assert user is not None
        limits = self._store.user_limits(user)
        exceeded = self.quota_exceeded(user, limits)
        if exceeded:
            return "quota", f"{exceeded} quota used up"
        limit = limits.max_sessions or self._config().max_sessions_per_user
        if not self.user_sessions.acquire(user, limit):
            return "user_sessions", f"user {user} has {limit} sessions already"
        rate = self._rates.get(user)
        if rate is None or not rate.matches(limits):
            fresh = _UserRate(_bucket(limits.rate_up), _bucket(limits.rate_down))
            fresh.sessions = rate.sessions if rate else 0
            rate = self._rates[user] = fresh
        rate.sessions += 1
        self._open.add(session)
        return None

    def quota_exceeded(self, user: str, limits: UserLimits) -> str | None:
        """The period (``day``, ``month``) whose quota *user* has used up, if any."""
        if limits.quota_day is None and limits.quota_month is None:
            return None  # usage costs a pass over live sessions: only where a quota applies
        return quota_exceeded(limits, *self._accountant.period_usage(user, time.time()))

    def max_duration(self, session: Session) -> float | None:
        """The session's lifetime limit: the user's own, else the server's."""
        own = self._store.user_limits(session.user) if session.user else UserLimits()
        return own.max_session_duration or self._config().max_session_duration

    def _release(self, session: Session) -> None:
        if session in self._open:
            self._open.discard(session)
            if session.user:
                self.user_sessions.release(session.user)
                rate = self._rates.get(session.user)
                if rate is not None:
                    rate.sessions -= 1
                    if rate.sessions <= 0:
                        del self._rates[session.user]

    def end_request(self, session: Session) -> None:
        """Give back what :meth:`open` holds for *session* before its next request is judged
        (HTTP keep-alive); the session's end does it otherwise."""
        self._release(session)

    def rated_users(self) -> Iterator[tuple[str, UserLimits]]:
        """Each user with a session holding a slot, and its limits read from the store now;
        its byte buckets are swapped first where its rates changed."""
        for user, rate in list(self._rates.items()):
            limits = self._store.user_limits(user)
            if not rate.matches(limits):
                rate.up, rate.down = _bucket(limits.rate_up), _bucket(limits.rate_down)
            yield user, limits

    def throttles(self, session: Session) -> tuple[Throttle | None, Throttle | None]:
        """Callbacks that hold a direction to its user's rate; ``None`` where there is none
        (so an unlimited session runs the relay's fast path untouched)."""
        rate = self._rates.get(session.user) if session.user else None
        if rate is None:
            return None, None

        def throttle(direction: str) -> Throttle | None:
            if getattr(rate, direction) is None:
                return None

            async def wait(n: int) -> None:
                bucket = getattr(rate, direction)  # the watcher may swap it after a change
                if bucket is not None:
                    delay = bucket.consume(n, trio.current_time())
                    if delay > 0:
                        await trio.sleep(delay)

            return wait

        return throttle("up"), throttle("down")
