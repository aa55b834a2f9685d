"""Migration 3 of both backends: user names stored by an older trisocks, renamed to their
normalized form."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from trisocks.usernames import normalize_username

__all__ = ["PER_USER_TABLES", "rename_legacy_names"]

log = logging.getLogger("trisocks.store")

PER_USER_TABLES = ("usage", "usage_daily", "user_limits")
"""Rows keyed by user name: a removed (or re-added) user starts from nothing."""

_Execute = Callable[..., list[tuple[Any, ...]]]


def rename_legacy_names(execute: _Execute) -> None:
    """Migration: rename users stored by an older trisocks to their normalized names
    (:func:`trisocks.usernames.normalize_username`), with their accounting and limits. A name
    that cannot be normalized, or whose normalized form another user has, is kept as it is
    (it still logs in when typed exactly) and named in a warning. For both backends: *execute*
    runs one statement (``?`` placeholders) in the migration's transaction."""
    names = [row[0] for row in execute("SELECT name FROM users")]
    taken = set(names)
    for name in sorted(names):
        try:
            normal = normalize_username(name)
        except ValueError as exc:
            log.warning("user %r kept as it is (log in with exactly that name): %s", name, exc)
            continue
        if normal == name:
            continue
        if normal in taken:
            log.warning("user %r kept as it is: its normalized name %r is another user's",
                        name, normal)
            continue
        execute("UPDATE users SET name = ? WHERE name = ?", (normal, name))
        for table in PER_USER_TABLES:
            execute(f'DELETE FROM {table} WHERE "user" = ?', (normal,))
            execute(f'UPDATE {table} SET "user" = ? WHERE "user" = ?', (normal, name))
        taken.add(normal)
        log.warning("user %r renamed to %r (normalized, RFC 8265)", name, normal)
