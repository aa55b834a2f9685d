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

Revocation follows the identity's source. The store's users are watched as above. An
external identity (PAM, LDAP, the HTTP hook) is no row of the store, so a reload never ends its
sessions for "user removed" (rules still apply to every session); instead
:class:`IdentityWatcher` asks its backend again every ``auth_revalidate_interval`` seconds, and
ends its sessions with reason ``revoked by <source>`` when the source now refuses it. A backend
that is down (:class:`~trisocks.identity.model.BackendError`) ends nothing: live sessions are
kept until it answers again, while new logins it would decide fail closed. GSSAPI and TLS
identities carry no password to check again: they are not revalidated (a Kerberos session
lasts as its handshake allowed; a reload keeps it).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from trisocks.identity.logins import QUIET
from trisocks.identity.model import (
    BackendError,
    Identity,
    LoginRequest,
    PasswordBackend,
    parse_account,
)
from trisocks.logs import quote
from trisocks.net import ip_of
from trisocks.protocol import Command
from trisocks.sessions import Session, SessionRegistry

if TYPE_CHECKING:
    from trisocks.identity.logins import Logins
    from trisocks.identity.store import Authenticator
    from trisocks.server.judge import Judge
    from trisocks.server.stats import Stats
    from trisocks.server.user_limits import UserLimiter
    from trisocks.store.interface import UserStore

__all__ = ["KILLED_BY_ADMIN", "WATCH_INTERVAL", "CredentialWatcher", "IdentityWatcher",
           "QuotaWatcher", "kill_user_sessions", "revoke", "revoke_disallowed", "source_of"]

log = logging.getLogger("trisocks.admin")
policy_log = logging.getLogger("trisocks.policy")
"""The limits' logger: quota and reload revocations."""

WATCH_INTERVAL = 0.5
"""Seconds between quota checks of live sessions."""

REVOKED = "credentials revoked"
KILLED_BY_ADMIN = "killed by admin"
REVALIDATE_AT_ONCE = 8
"""External accounts revalidated concurrently, at most."""


def source_of(session: Session) -> str | None:
    """Which source vouched for *session*'s user: :attr:`Session.source`, else what the
    account name says (:func:`~trisocks.identity.model.parse_account`); ``None`` if anonymous."""
    if session.user is None:
        return None
    return session.source or parse_account(session.user)[0]


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
            if source_of(session) != "store":
                continue  # an external identity: IdentityWatcher's
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
    longer allow; return how many. Only the store's users can be removed from *store*: an
    external identity's sessions are judged by the rules alone (module docstring)."""
    ended = 0
    for session, query in list(judge.queries.items()):
        reason = None
        if source_of(session) == "store" and not store.has_user(str(session.user)):
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


class IdentityWatcher:
    """Revalidates the external accounts with live sessions in *registry* every *interval()*
    seconds through the chain *logins()* gives (read each round: a reload may build a new one;
    :meth:`~trisocks.identity.logins.Logins.remembered`): an account
    its backend now refuses has its sessions ended (``revoked by <source>``) and is forgotten;
    a backend error keeps the sessions (logged once per burst); an account with no live
    session is forgotten."""

    def __init__(self, logins: Callable[[], Logins], registry: SessionRegistry,
                 interval: Callable[[], float]) -> None:
        self._logins = logins
        self._registry = registry
        self._interval = interval
        self._last_error: dict[str, float] = {}
        self._limiter = trio.CapacityLimiter(REVALIDATE_AT_ONCE)

    async def check(self) -> int:
        """One round; return how many sessions it ended."""
        live = {s.user for s in self._registry if s.user is not None}
        logins = self._logins()
        ended = 0

        async def one(account: str, entry: tuple[Identity, LoginRequest, PasswordBackend]) -> None:
            nonlocal ended
            identity, request, backend = entry
            async with self._limiter:
                try:
                    valid = await backend.revalidate(identity, request)
                except BackendError as exc:
                    self._log_error(identity.source, exc)
                    return
            current = logins.remembered().get(account)
            if valid or current is None or current[1] is not request:
                return  # still valid, or a fresh login replaced what was checked
            reason = f"revoked by {identity.source}"
            logins.forget(account)
            killed = kill_user_sessions(self._registry, account, reason)
            log.info("account %s: %s; ended %d sessions", quote(account), reason, killed)
            ended += killed

        async with trio.open_nursery() as nursery:
            for account, entry in logins.remembered().items():
                if account not in live:
                    logins.forget(account)
                elif entry[0].source not in ("gssapi", "tls"):
                    nursery.start_soon(one, account, entry)
        return ended

    def _log_error(self, source: str, exc: BackendError) -> None:
        now = trio.current_time()
        last = self._last_error.get(source)
        self._last_error[source] = now
        if last is None or now - last > max(QUIET, 2 * self._interval()):
            log.warning("revalidation: password backend %s cannot answer: %s (its sessions "
                        "are kept)", source, exc)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Revalidate every *interval()* seconds until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(self._interval())
            try:
                await self.check()
            except Exception:  # one bad round must not stop the proxy; the next retries
                log.exception("identity revalidation failed")
