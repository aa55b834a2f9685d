"""The chain of password backends: where an RFC 1929 (or HTTP ``Basic``) login is checked.

``password_backends`` lists backends in order; the first that accepts the credentials decides
the identity. A backend that refuses them (a wrong password, a user it does not know) passes
the login to the next one. A backend that cannot answer (:class:`BackendError`: down, timed
out, a malformed reply) fails the login closed at once, RFC 1929 status 01: a later backend
must not speak for a user the failing one may own. Errors are counted per backend and logged
once per burst (a burst ends after :data:`QUIET` seconds without one).

External logins that succeed are cached for ``auth_cache_ttl`` seconds, as a keyed BLAKE2
digest of the password (never the password itself); a cached login is answered from memory.
A refusal is cached only :data:`FAILURE_TTL` seconds, so a mistyped password costs the
directory one query per few seconds at most, and a corrected one works at once. The store
backend keeps its own cache (:mod:`trisocks.identity.store`), which a password change makes
stale at once.

For revalidation (``auth_revalidate_interval``) the chain remembers, per external account, the
last successful login's credentials while the account has live sessions
(:meth:`Logins.remembered`): a fresh check needs them. They live only in this process's memory.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import secrets
from collections.abc import Sequence

import attrs
import trio

from trisocks.identity.model import BackendError, Identity, LoginRequest, PasswordBackend

__all__ = ["FAILURE_TTL", "QUIET", "LoginCounts", "Logins"]

log = logging.getLogger("trisocks.auth")

FAILURE_TTL = 3.0
"""Seconds a refused external login is answered from memory."""
QUIET = 30.0
"""Seconds without an error after which a backend's next error is logged again."""
CACHE_LIMIT = 10_000
"""Cached logins kept at most (the oldest go first)."""


@attrs.define
class LoginCounts:
    """Per backend (``/metrics``): logins it accepted, refused, and could not answer."""

    accepted: collections.Counter[str] = attrs.field(factory=collections.Counter)
    refused: collections.Counter[str] = attrs.field(factory=collections.Counter)
    errors: collections.Counter[str] = attrs.field(factory=collections.Counter)


@attrs.define
class _Cached:
    digest: bytes
    identity: Identity | None
    expires: float


@attrs.define
class _Remembered:
    identity: Identity
    request: LoginRequest
    backend: PasswordBackend


class Logins:
    """Checks logins against *backends* in order (module docstring)."""

    def __init__(
        self, backends: Sequence[PasswordBackend], *, cache_ttl: float = 60.0,
        counts: LoginCounts | None = None,
    ) -> None:
        self.backends = tuple(backends)
        self.cache_ttl = cache_ttl
        self.counts = counts or LoginCounts()
        self._key = secrets.token_bytes(32)
        self._cache: dict[tuple[str, bytes], _Cached] = {}
        self._remembered: dict[str, _Remembered] = {}
        self._last_error: dict[str, float] = {}

    def _digest(self, request: LoginRequest) -> bytes:
        return hashlib.blake2b(request.password, key=self._key, digest_size=32).digest()

    async def login(self, request: LoginRequest) -> Identity | None:
        """The identity *request*'s credentials prove, or ``None`` (refused, or a backend
        error: fail closed)."""
        digest = b""  # computed once an external backend is reached (the store keeps its own)
        now = trio.current_time()
        for backend in self.backends:
            source = backend.source
            key = (source, request.user)
            if source != "store" and not digest:
                digest = self._digest(request)
            cached = self._cache.get(key) if source != "store" else None
            if cached is not None and cached.expires > now and hmac.compare_digest(
                    cached.digest, digest):
                if cached.identity is None:
                    continue
                self._remember(cached.identity, request, backend)
                return cached.identity
            try:
                identity = await backend.login(request)
            except BackendError as exc:
                self.counts.errors[source] += 1
                self._log_error(source, exc, now)
                return None
            if source != "store":
                ttl = self.cache_ttl if identity is not None else FAILURE_TTL
                self._put(key, _Cached(digest, identity, trio.current_time() + ttl))
            if identity is None:
                self.counts.refused[source] += 1
                continue
            self.counts.accepted[source] += 1
            self._remember(identity, request, backend)
            return identity
        return None

    def _put(self, key: tuple[str, bytes], entry: _Cached) -> None:
        self._cache.pop(key, None)
        if len(self._cache) >= CACHE_LIMIT:
            self._cache.pop(next(iter(self._cache)))
        self._cache[key] = entry

    def _remember(self, identity: Identity, request: LoginRequest, backend: PasswordBackend
                  ) -> None:
        if identity.source != "store":
            self._remembered[identity.account] = _Remembered(identity, request, backend)

    def _log_error(self, source: str, exc: BackendError, now: float) -> None:
        last = self._last_error.get(source)
        self._last_error[source] = now
        if last is None or now - last > QUIET:
            log.warning("password backend %s cannot answer: %s (logins it would decide fail "
                        "closed; logged again after %.0f quiet seconds)", source, exc, QUIET)

    def remembered(self) -> dict[str, tuple[Identity, LoginRequest, PasswordBackend]]:
        """Per external account: its identity, the credentials of its last login and the
        backend that accepted them (for revalidation)."""
        return {account: (r.identity, r.request, r.backend)
                for account, r in self._remembered.items()}

    def adopt(self, old: Logins) -> list[str]:
        """Take over what *old* (the chain a reload replaces) remembers, bound to this chain's
        backend of the same source; return the accounts whose source is no longer configured
        (their sessions cannot be revalidated)."""
        by_source = {backend.source: backend for backend in self.backends}
        orphans = []
        for account, entry in old._remembered.items():
            backend = by_source.get(entry.identity.source)
            if backend is None:
                orphans.append(account)
            else:
                self._remembered[account] = _Remembered(entry.identity, entry.request, backend)
        return orphans

    def forget(self, account: str) -> None:
        """Drop what is cached and remembered for *account* (no live session needs it, or the
        source refused it)."""
        entry = self._remembered.pop(account, None)
        if entry is not None:
            self._cache.pop((entry.identity.source, entry.request.user), None)

    async def aclose(self) -> None:
        for backend in self.backends:
            await backend.aclose()
