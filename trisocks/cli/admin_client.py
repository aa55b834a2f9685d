"""A small synchronous client of the admin API for the CLI, and plain-text tables.

Where the CLI finds the server: ``--url``, else ``$TRISOCKS_ADMIN_URL``, else
``http://127.0.0.1:8080`` (the default ``--admin``). The token: ``--token``, else
``$TRISOCKS_ADMIN_TOKEN``, else the ``admin-token`` file the server wrote next to its db.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from trisocks.admin.tokens import TOKEN_ENV, token_path
from trisocks.config import is_db_url

__all__ = ["URL_ENV", "AdminClient", "AdminError", "find_token", "format_table"]

URL_ENV = "TRISOCKS_ADMIN_URL"
DEFAULT_URL = "http://127.0.0.1:8080"


class AdminError(Exception):
    """The API could not be reached or answered with an error; the message says which."""


def find_token(flag: str | None, db: Path | str) -> str:
    """The token from the flag, the environment, or the server's token file."""
    if flag:
        return flag
    if env := os.environ.get(TOKEN_ENV):
        return env
    if is_db_url(db):
        raise AdminError(f"no admin token: pass --token or set {TOKEN_ENV} (servers on "
                         "PostgreSQL keep no token file)")
    path = token_path(Path(db))
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise AdminError(
            f"no admin token: pass --token, set {TOKEN_ENV}, or make {path} readable "
            f"({exc.strerror})"
        ) from None


class AdminClient:
    """A synchronous admin API client for the CLI; use it as a context manager."""

    def __init__(self, url: str | None, token: str, *, timeout: float = 10.0) -> None:
        """Raises:
            AdminError: *url* is not a usable URL (httpx.InvalidURL is no HTTPError).
        """
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        try:
            self._http = httpx.Client(
                base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
            )
        except httpx.InvalidURL as exc:
            raise AdminError(f"bad admin API URL {self.url!r}: {exc}") from None

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *_: object) -> None:
        self._http.close()

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send one request; return the decoded JSON (``None`` for 204).

        Raises:
            AdminError: connection failure, or a status >= 400 (with the server's message).
        """
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.InvalidURL as exc:
            raise AdminError(f"bad admin API URL {self.url!r}: {exc}") from None
        except httpx.HTTPError as exc:
            raise AdminError(f"cannot reach the admin API at {self.url}: {exc}") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]
            except (ValueError, KeyError, TypeError):
                message = response.reason_phrase
            raise AdminError(f"{message} (HTTP {response.status_code})")
        return None if response.status_code == 204 else response.json()


def format_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Columns padded to their widest cell; numbers right-aligned; ``None`` as ``-``."""
    cells = [[("-" if v is None else str(v)) for v in row] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    numeric = [bool(rows) and all(isinstance(r[i], int) for r in rows)
               for i in range(len(columns))]

    def line(values: Sequence[str]) -> str:
        padded = zip(values, widths, numeric, strict=True)
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in padded).rstrip()

    return "\n".join([line(columns), *(line(r) for r in cells)])
