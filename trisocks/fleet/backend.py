"""The store interface, and opening the right backend for a ``db`` setting.

Two backends implement it: :class:`trisocks.store.Store` (SQLite, the embedded default) and
:class:`trisocks.fleet.postgres.PostgresStore`. The server reads the store from the trio loop,
so with PostgreSQL it holds a :class:`trisocks.fleet.cache.CachedStore` (same interface,
answered from memory) instead of the blocking store itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol

from trisocks.config import is_db_url
from trisocks.policy.quotas import UserLimits
from trisocks.store import Store, StoreError, UsageDelta, UserUsage

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


def open_store(db: Path | str, *, create_dir: bool = False, serving: bool = False) -> UserStore:
    """Open *db*: an SQLite file, or a PostgreSQL URL (cached when *serving*: see the module
    docstring). Migrations are applied on open.

    Raises:
        StoreError: the database cannot be opened or has a newer schema.
    """
    if not is_db_url(db):
        return Store(db, create_dir=create_dir)
    import psycopg  # loads only when used

    from trisocks.fleet.cache import CachedStore
    from trisocks.fleet.postgres import PostgresStore

    store = PostgresStore(str(db))
    if not serving:
        return store
    try:
        return CachedStore(store)
    except psycopg.Error as exc:
        store.close()
        raise StoreError(f"cannot read the store: {exc}") from None
