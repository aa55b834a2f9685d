"""The store interface, and opening the right backend for a ``db`` setting.

Two backends implement it: :class:`trisocks.store.Store` (SQLite, the embedded default) and
:class:`trisocks.fleet.postgres.PostgresStore`. The server reads the store from the trio loop,
so it holds a :class:`trisocks.fleet.cache.CachedStore` (same interface, answered from memory,
written from worker threads) instead of the blocking store itself: a PostgreSQL round trip, or
an SQLite write lock another process holds, never stalls the sessions.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from trisocks.config import is_db_url
from trisocks.policy.quotas import UserLimits
from trisocks.store import Store, StoreError, UsageDelta, UserUsage

if TYPE_CHECKING:
    from trisocks.fleet.postgres import PostgresStore

__all__ = ["UserStore", "open_store"]


class UserStore(Protocol):
    """Users, per-user accounting and limits. Errors a user can fix raise
    :class:`trisocks.store.StoreError`."""

    def password_hash(self, name: str) -> str | None: ...
    def users(self) -> list[str]: ...
    def has_user(self, name: str) -> bool: ...
    def add_user(self, name: str, password_hash: str) -> None: ...
    def set_password(self, name: str, password_hash: str) -> None: ...
    def remove_user(self, name: str) -> None: ...
    def add_usage(self, deltas: Iterable[tuple[str, UsageDelta]]) -> None: ...
    def bytes_since(self, user: str, day: str) -> int: ...
    def user_limits(self, name: str) -> UserLimits: ...
    def set_user_limits(self, name: str, limits: UserLimits) -> None: ...
    def usage(self, name: str | None = None) -> list[UserUsage]: ...
    def close(self) -> None: ...


def open_store(
    db: Path | str, *, create_dir: bool = False, serving: bool = False, read_only: bool = False
) -> UserStore:
    """Open *db*: an SQLite file, or a PostgreSQL URL (cached when *serving*: see the module
    docstring). Migrations are applied on open; with *read_only* (``trisocks check``) nothing
    is written, the schema version is only checked.

    Raises:
        StoreError: the database cannot be opened, or has a newer or unknown schema (one line:
            ``database X has schema version N, this trisocks knows up to M...``).
    """
    from trisocks.fleet.cache import CachedStore

    backend: Store | PostgresStore
    if not is_db_url(db):
        backend = Store(db, create_dir=create_dir, read_only=read_only)
    else:
        from trisocks.fleet.postgres import PostgresStore

        backend = PostgresStore(str(db), read_only=read_only)
    if not serving:
        return backend
    try:
        return CachedStore(backend)
    except backend.TRANSIENT_ERRORS as exc:
        backend.close()
        raise StoreError(f"cannot read the store: {exc}") from None
