"""Revocation is real: a session ends when its user is removed or its password changes.

The admin API revokes at once (:func:`revoke`). Changes made by another process (``trisocks
user remove/passwd`` on the same db) are caught by :class:`CredentialWatcher`: it remembers the
stored password hash each session's user had when its request was read and, every second,
compares it with the store; a session whose user is gone or whose hash changed is killed. The
check is one indexed lookup per distinct user with a live session.

Known gap: a password changed between the credential check and the request (a few
milliseconds while scrypt runs) is taken as the session's snapshot.
"""

from __future__ import annotations

import logging
import sqlite3
from typing import TYPE_CHECKING

import trio

from trisocks.sessions import Session

if TYPE_CHECKING:
    from trisocks.server.context import ServerContext

__all__ = ["KILLED_BY_ADMIN", "CredentialWatcher", "kill_user_sessions", "revoke"]

log = logging.getLogger("trisocks.admin")

REVOKED = "credentials revoked"
KILLED_BY_ADMIN = "killed by admin"


def kill_user_sessions(
    ctx: ServerContext, name: str, reason: str = KILLED_BY_ADMIN
) -> int:
    """End every live session of *name*; return how many."""
    sessions = ctx.registry.select(lambda s: s.user == name)
    for session in sessions:
        session.kill(reason)
    return len(sessions)


def revoke(ctx: ServerContext, name: str) -> int:
    """End every live session of *name* and drop its cached credentials; return how many."""
    ctx.authenticator.forget(name)
    return kill_user_sessions(ctx, name, REVOKED)


class CredentialWatcher:
    """Kills sessions whose credentials changed in the store since they authenticated."""

    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx
        self._hashes: dict[Session, str | None] = {}
        """Stored hash of each authenticated session's user, taken at its request."""

    def _on_event(self, event: str, session: Session) -> None:
        if event == "request" and session.user is not None:
            try:
                self._hashes[session] = self._ctx.store.password_hash(session.user)
            except sqlite3.Error:  # taken at the next check instead
                log.exception("reading the password hash of %r", session.user)
        elif event == "end":
            self._hashes.pop(session, None)

    def check(self) -> int:
        """Kill the sessions whose user's hash differs from their snapshot; return how many."""
        current: dict[str, str | None] = {}
        killed = 0
        for session in self._ctx.registry:
            user = session.user
            if user is None or session.command is None:
                continue  # not past the request yet: nothing to compare with
            if user not in current:
                current[user] = self._ctx.store.password_hash(user)
            snapshot = self._hashes.setdefault(session, current[user])
            if snapshot != current[user]:
                log.info("session %s: user %r was removed or changed password", session.id, user)
                self._ctx.authenticator.forget(user)
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
        self._ctx.registry.add_listener(self._on_event)
        task_status.started()
        try:
            while True:
                await trio.sleep(interval)
                try:
                    self.check()
                except sqlite3.Error:  # a transient store problem must not stop the proxy
                    log.exception("credential check failed; retrying")
        finally:
            self._ctx.registry.remove_listener(self._on_event)
