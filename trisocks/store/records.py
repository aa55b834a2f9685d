"""The store's value types and errors, shared by every backend and by what reads them."""

from __future__ import annotations

import attrs

from trisocks.policy.quotas import UserLimits

__all__ = ["ANONYMOUS", "EXTERNAL_PREFIXES", "Snapshot", "StoreError", "UsageDelta", "UserUsage",
           "is_external", "schema_error", "validate_username"]

ANONYMOUS = "(anonymous)"
"""The name sessions without authentication are accounted under; no user can take it."""
EXTERNAL_PREFIXES = ("pam:", "ldap:", "http:", "gssapi:", "tls:")
"""How the account names of identities from other sources begin
(:func:`trisocks.identity.model.account_name`): no store user may take such a name, so none can
stand for an external identity."""


def is_external(name: str) -> bool:
    """Whether *name* is the account of an identity another source vouched for (it has no
    row in ``users``; its usage and limits are still kept by name)."""
    return name.startswith(EXTERNAL_PREFIXES)


class StoreError(Exception):
    """A user-facing problem with the store (duplicate user, unknown user, bad name)."""


def validate_username(name: str) -> str:
    """Names are 1..255 UTF-8 bytes (RFC 1929 ULEN), without control characters, and not
    reserved: ``(anonymous)``, anything starting with ``(``, or an external source's prefix
    (:data:`EXTERNAL_PREFIXES`)."""
    raw = name.encode()
    if not raw:
        raise StoreError("user name must not be empty")
    if len(raw) > 255:
        raise StoreError(f"user name is {len(raw)} bytes; RFC 1929 allows at most 255")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise StoreError("user name must not contain control characters")
    if name == ANONYMOUS:
        raise StoreError(f"{ANONYMOUS} is reserved for unauthenticated sessions")
    if name.startswith("("):  # (anonymous), (other) in metrics: the server's own rows
        raise StoreError("user names starting with '(' are reserved, like (anonymous)")
    if is_external(name):
        prefix = name.partition(":")[0]
        raise StoreError(f"user names starting with {prefix + ':'!r} are reserved for "
                         f"identities from {prefix} (account names such as {prefix}:alice)")
    return name


@attrs.frozen
class UsageDelta:
    """Counters to add to one user's totals."""

    sessions: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    datagrams_up: int = 0
    datagrams_down: int = 0
    last_seen: float | None = None


@attrs.frozen
class UserUsage:
    """Persisted totals for one user."""

    user: str
    sessions_total: int
    bytes_up: int
    bytes_down: int
    datagrams_up: int
    datagrams_down: int
    last_seen: float | None


@attrs.define
class Snapshot:
    """Everything the server reads per session, loaded in one go for the cache
    (:class:`trisocks.store.cache.CachedStore`), from either backend."""

    passwords: dict[str, str]
    limits: dict[str, UserLimits]
    usage: dict[str, UserUsage]
    daily: dict[str, dict[str, int]]
    """``user -> day -> bytes`` (both directions) for the days from the snapshot's start on."""


def schema_error(where: str, version: int, known: int) -> StoreError:
    """The one line for a database this trisocks cannot use (a newer or unknown schema)."""
    return StoreError(f"database {where} has schema version {version}, this trisocks knows up "
                      f"to {known}: upgrade trisocks, or use another database")
