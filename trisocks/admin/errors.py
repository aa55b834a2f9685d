"""Every error answer is ``{"error": "..."}`` with its HTTP status, including Werkzeug's own
404/405 and bad-JSON cases, so clients parse one shape.

A failing store (SQLite locked, disk full or read-only, I/O errors, PostgreSQL down) or
another OS error during a request is a 503 naming the cause; any other exception is a 500
``{"error": "internal error"}`` with the traceback in the log, never an HTML page.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
from typing import Any

from werkzeug.exceptions import HTTPException

from trisocks.admin.bodies import json_body
from trisocks.store.records import StoreError

__all__ = ["json_body", "json_error", "store_errors", "unavailable", "unexpected_error"]

log = logging.getLogger("trisocks.admin")

ErrorAnswer = tuple[dict[str, Any], int, dict[str, str]]


async def json_error(exc: HTTPException) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Answer any HTTP error as ``{"error": ...}`` with its status (401 names the scheme)."""
    headers = {"WWW-Authenticate": 'Bearer realm="trisocks"'} if exc.code == 401 else {}
    return {"error": exc.description or exc.name}, exc.code or 500, headers


def store_errors(store: object = None) -> tuple[type[Exception], ...]:
    """The exception types of a failing store: SQLite's, :class:`StoreError` (one that no
    route turned into a 4xx, such as "cannot open database"), psycopg's when loaded (it is
    only imported for a PostgreSQL store), and those *store* declares transient."""
    types: list[type[Exception]] = [sqlite3.Error, StoreError]
    types += getattr(store, "TRANSIENT_ERRORS", ())
    if "psycopg" in sys.modules:
        types.append(sys.modules["psycopg"].Error)
    if "psycopg_pool" in sys.modules:
        types.append(sys.modules["psycopg_pool"].PoolTimeout)
    return tuple(types)


def _cause(exc: BaseException) -> str:
    text = (exc.strerror if isinstance(exc, OSError) else None) or str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]  # psycopg adds lines of detail


async def unavailable(exc: Exception) -> ErrorAnswer:
    """503 for a store or OS failure: the request may succeed once the cause is gone."""
    prefix = "unavailable" if isinstance(exc, OSError) else "store unavailable"
    log.warning("admin API: %s: %s", prefix, exc)
    return {"error": f"{prefix}: {_cause(exc)}"}, 503, {}


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


async def unexpected_error(exc: Exception) -> ErrorAnswer:
    """The last resort: errors wrapped in an exception group (a nursery in a route) are
    answered as their first HTTP or store error would be; anything else is a bug, logged
    with its traceback and answered with a JSON 500."""
    leaves = _leaves(exc)
    for leaf in leaves:
        if isinstance(leaf, HTTPException):
            return await json_error(leaf)
    for leaf in leaves:
        if isinstance(leaf, (*store_errors(), OSError)):
            return await unavailable(leaf)  # type: ignore[arg-type]
    log.error("admin API: internal error", exc_info=exc)
    return {"error": "internal error"}, 500, {}
