"""The ``store`` password backend: RFC 1929 credentials checked against the store's scrypt
table without stalling the event loop.

scrypt takes tens of milliseconds, so it runs in a worker thread (at most two at once). A
successful check leaves a keyed BLAKE2 digest of the password in memory, bound to the stored
hash it matched: the next login with the same password costs one dictionary lookup and a
constant-time compare, and changing the password in the store (from any process) makes the
digest stale at once because the stored hash differs.

A name is looked up as sent, then in its normalized form (:mod:`trisocks.usernames`: RFC 8265
UsernameCaseMapped), and the session's user is the stored name it matched.

Identical checks in flight at once (the same name, stored hash and password: a fleet of clients
starting together) share one scrypt run: the later ones wait for the first one's answer, which
takes as long as their own check would, so the merge tells an attacker nothing.

Only successes take the shortcut. A wrong password always costs a full scrypt check, as an
unknown user does: otherwise a quick "no" would tell an attacker that the name exists and
logged in recently, and let it guess that user's password at no cost to the server.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import TYPE_CHECKING

import attrs
import trio

from trisocks.identity.model import Identity, LoginRequest
from trisocks.passwords import DUMMY_HASH, verify_password
from trisocks.usernames import login_form

if TYPE_CHECKING:
    from trisocks.store.interface import UserStore

__all__ = ["Authenticator"]


@attrs.define(eq=False)
class _Check:
    """A scrypt check in flight, which identical checks wait for."""

    done: trio.Event = attrs.field(factory=trio.Event)
    ok: bool | None = None
    """Its answer; ``None`` if it was cancelled before it had one."""


class Authenticator:
    """Checks RFC 1929 credentials against *store* (module docstring: threads, cache)."""

    def __init__(self, store: UserStore, *, threads: int = 2) -> None:
        self._store = store
        self._key = secrets.token_bytes(32)
        self._verified: dict[str, tuple[str, bytes]] = {}
        self._limiter = trio.CapacityLimiter(threads)
        self._in_flight: dict[tuple[str, str, bytes], _Check] = {}

    def _digest(self, password: bytes) -> bytes:
        return hashlib.blake2b(password, key=self._key, digest_size=32).digest()

    async def check(self, username: bytes, password: bytes) -> str | None:
        """Return the user's name if the credentials are right, else ``None``."""
        try:
            name = username.decode()
        except UnicodeDecodeError:
            name = None
        stored = self._store.password_hash(name) if name is not None else None
        if name is not None and stored is None and (normal := login_form(name)) is not None:
            stored = self._store.password_hash(normal)  # "Alice" logs in as user "alice"
            name = normal
        if name is None or stored is None:  # as slow as a real check (module docstring)
            await self._verify(password, DUMMY_HASH)
            return None
        digest = self._digest(password)
        cached = self._verified.get(name)
        if cached is not None and cached[0] == stored and hmac.compare_digest(cached[1], digest):
            return name
        key = (name, stored, digest)
        check = self._in_flight.get(key)
        if check is not None:  # the same check is running: its answer is ours
            await check.done.wait()
            if check.ok is not None:
                return name if check.ok else None
            # it was cancelled before it answered: check on our own
        check = self._in_flight[key] = _Check()
        try:
            check.ok = await self._verify(password, stored)
        finally:
            if self._in_flight.get(key) is check:
                del self._in_flight[key]
            check.done.set()
        if not check.ok:
            return None
        self._verified[name] = (stored, digest)
        return name

    async def _verify(self, password: bytes, stored: str) -> bool:
        return await trio.to_thread.run_sync(
            verify_password, password, stored, limiter=self._limiter
        )

    source = "store"

    async def login(self, request: LoginRequest) -> Identity | None:
        """:meth:`check` as a password backend (``PasswordBackend``)."""
        name = await self.check(request.user, request.password)
        return None if name is None else Identity("store", name)

    async def revalidate(self, identity: Identity, request: LoginRequest) -> bool:
        """Store users are revalidated as their hash changes (``CredentialWatcher``)."""
        return self._store.has_user(identity.name)

    async def aclose(self) -> None:
        pass

    def forget(self, name: str) -> None:
        """Drop what is cached for *name* (after a password change or removal)."""
        self._verified.pop(name, None)
