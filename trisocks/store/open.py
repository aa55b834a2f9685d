"""Opening the right backend for a ``db`` setting.

The server reads the store from the trio loop, so it holds a
:class:`trisocks.store.cache.CachedStore` (same interface, answered from memory, written from
worker threads) instead of the blocking store itself: a PostgreSQL round trip, or an SQLite
write lock another process holds, never stalls the sessions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from trisocks.config import is_db_url
from trisocks.store.cache import CachedStore
from trisocks.store.interface import UserStore
from trisocks.store.records import StoreError
from trisocks.store.sqlite import Store

if TYPE_CHECKING:
    from trisocks.store.postgres import PostgresStore

__all__ = ["open_store"]


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
    backend: Store | PostgresStore
    if not is_db_url(db):
        backend = Store(db, create_dir=create_dir, read_only=read_only)
    else:
        from trisocks.store.postgres import PostgresStore

        backend = PostgresStore(str(db), read_only=read_only)
    if not serving:
        return backend
    try:
        return CachedStore(backend)
    except backend.TRANSIENT_ERRORS as exc:
        backend.close()
        raise StoreError(f"cannot read the store: {exc}") from None
