"""The store's value types and errors, shared by every backend and by what reads them."""

from __future__ import annotations

import attrs

from trisocks.policy.quotas import UserLimits

__all__ = ["ANONYMOUS", "Snapshot", "StoreError", "UsageDelta", "UserUsage", "schema_error",
           "validate_username"]

ANONYMOUS = "(anonymous)"
"""The name sessions without authentication are accounted under; no user can take it."""


class StoreError(Exception):
    """A user-facing problem with the store (duplicate user, unknown user, bad name)."""


def validate_username(name: str) -> str:
    """Names are 1..255 UTF-8 bytes (RFC 1929 ULEN), without control characters."""
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
