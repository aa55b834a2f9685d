"""Revocation is real: a session ends when its user is removed or its password changes.

The admin API revokes at once (:func:`revoke`). Changes made by another process (``trisocks
user remove/passwd`` on the same db) are caught by :class:`CredentialWatcher`: it remembers the
stored password hash each session's user had when its request was read and, every second,
compares it with the store; a session whose user is gone or whose hash changed is killed. The
check is one indexed lookup per distinct user with a live session.

Known gap: a password changed between the credential check and the request (a few
milliseconds while scrypt runs) is taken as the session's snapshot.

Limits end sessions too: :class:`QuotaWatcher` ends the sessions of users over quota, and
after a reload :func:`revoke_disallowed` ends those the new rules or user set no longer allow.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import TYPE_CHECKING

import attrs
import trio

from trisocks.logs import quote
from trisocks.net import ip_of
from trisocks.protocol import Command
from trisocks.sessions import Session, SessionRegistry

if TYPE_CHECKING:
    from trisocks.auth import Authenticator
    from trisocks.server.judge import Judge
    from trisocks.server.stats import Stats
    from trisocks.server.user_limits import UserLimiter
    from trisocks.store.interface import UserStore

__all__ = ["KILLED_BY_ADMIN", "WATCH_INTERVAL", "CredentialWatcher", "QuotaWatcher",
           "kill_user_sessions", "revoke", "revoke_disallowed"]

log = logging.getLogger("trisocks.admin")
policy_log = logging.getLogger("trisocks.policy")
"""The limits' logger: quota and reload revocations."""

WATCH_INTERVAL = 0.5
"""Seconds between quota checks of live sessions."""

REVOKED = "credentials revoked"
KILLED_BY_ADMIN = "killed by admin"


def kill_user_sessions(
    registry: SessionRegistry, name: str, reason: str = KILLED_BY_ADMIN
) -> int:
    """End every live session of *name* in *registry*; return how many."""
    sessions = registry.select(lambda s: s.user == name)
    for session in sessions:
        session.kill(reason)
    return len(sessions)


def revoke(registry: SessionRegistry, authenticator: Authenticator, name: str) -> int:
    """End every live session of *name* and drop its cached credentials; return how many."""
    authenticator.forget(name)
    return kill_user_sessions(registry, name, REVOKED)


class CredentialWatcher:
    """Kills sessions of *registry* whose credentials changed in *store* since they
    authenticated (and makes *authenticator* forget them)."""

    def __init__(
        self, store: UserStore, registry: SessionRegistry, authenticator: Authenticator
    ) -> None:
        self._store = store
        self._registry = registry
        self._authenticator = authenticator
        self._hashes: dict[Session, str | None] = {}
        """Stored hash of each authenticated session's user, taken at its request."""

    def _on_event(self, event: str, session: Session) -> None:
        if event == "request" and session.user is not None:
            try:
                self._hashes[session] = self._store.password_hash(session.user)
            except sqlite3.Error:  # taken at the next check instead
                log.exception("reading the password hash of %r", session.user)
        elif event == "end":
            self._hashes.pop(session, None)

    def check(self) -> int:
        """Kill the sessions whose user's hash differs from their snapshot; return how many."""
        current: dict[str, str | None] = {}
        killed = 0
        for session in self._registry:
            user = session.user
            if user is None or session.command is None:
                continue  # not past the request yet: nothing to compare with
            if user not in current:
                current[user] = self._store.password_hash(user)
            snapshot = self._hashes.setdefault(session, current[user])
            if snapshot != current[user]:
                log.info("session %s: user %r was removed or changed password", session.id, user)
                self._authenticator.forget(user)
                session.kill(REVOKED)
                killed += 1
        return killed

    async def run(
        self,
        interval: float = 1.0,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Check every *interval* seconds until cancelled; started once it is listening."""
        self._registry.add_listener(self._on_event)
        task_status.started()
        try:
            while True:
                await trio.sleep(interval)
                try:
                    self.check()
                except sqlite3.Error:  # a transient store problem must not stop the proxy
                    log.exception("credential check failed; retrying")
        finally:
            self._registry.remove_listener(self._on_event)


class QuotaWatcher:
    """Ends the sessions of users over quota, and refreshes their byte rates, every
    :data:`WATCH_INTERVAL` seconds: *users* holds the users with sessions past their request,
    *registry* the sessions to end; what it ends is counted in ``stats.limited["quota"]``."""

    def __init__(self, users: UserLimiter, registry: SessionRegistry, stats: Stats) -> None:
        self._users = users
        self._registry = registry
        self._stats = stats

    def check_quotas(self) -> int:
        """End the sessions of users over quota and refresh rates; return how many ended."""
        ended = 0
        for user, limits in self._users.rated_users():
            exceeded = self._users.quota_exceeded(user, limits)
            if exceeded:
                sessions = [s for s in self._registry if s.user == user]
                policy_log.warning("user %s: %s quota used up; ending %d sessions",
                                   quote(user), exceeded, len(sessions))
                self._stats.limited["quota"] += len(sessions)
                for session in sessions:
                    session.kill(f"{exceeded} quota used up")
                ended += len(sessions)
        return ended

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check quotas every :data:`WATCH_INTERVAL` seconds until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(WATCH_INTERVAL)
            try:
                self.check_quotas()
            except Exception:  # a store hiccup must not stop the proxy; next tick retries
                policy_log.exception("quota check failed")


def revoke_disallowed(judge: Judge, store: UserStore) -> int:
    """After a reload: end the sessions the new rules (*judge*) or user set (*store*) no
    longer allow; return how many."""
    ended = 0
    for session, query in list(judge.queries.items()):
        reason = None
        if session.user is not None and not store.has_user(session.user):
            reason = "reload: user removed"
        else:
            resolved = session.resolved
            ip = ip_of(resolved.host) if resolved is not None and session.command not in (
                Command.UDP_ASSOCIATE, Command.RESOLVE_PTR) else query.ip  # PTR's: a name
            decision = judge.ruleset.decide(attrs.evolve(query, ip=ip))
            if decision is not None and not decision.allowed:
                reason = f"reload: denied by rule {decision.rule_id}"
        if reason is not None:
            policy_log.info("session %s (%s): %s", session.id, quote(session.user), reason)
            session.kill(reason)
            ended += 1
    return ended
