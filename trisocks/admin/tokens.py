"""The admin API's bearer token: where it comes from, and checking it.

Order: ``config.admin_token`` (given, or read from ``admin_token_file`` when the config was
built), then ``$TRISOCKS_ADMIN_TOKEN``, then the file ``admin-token``
next to the database, created (mode 0600) with a fresh random token when missing. The file is
reused on the next start, so the token an operator copied keeps working across restarts, and the
CLI on the same machine can read it. The token itself is never logged, only the file's path.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from pathlib import Path

from trisocks.config import Config, is_db_url
from trisocks.store.files import warn_if_readable

__all__ = ["TOKEN_ENV", "check_bearer", "resolve_token", "token_path"]

log = logging.getLogger("trisocks.admin")

TOKEN_ENV = "TRISOCKS_ADMIN_TOKEN"


def token_path(db: Path) -> Path:
    """Where the server keeps its generated token: ``admin-token`` next to the SQLite *db*."""
    return db.parent / "admin-token"


def _read_or_create(path: Path) -> str:
    try:
        # O_EXCL: two servers starting at once on one db must not both write a token.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        warn_if_readable(path)
        token = path.read_text().strip()
        if not token:
            raise OSError(f"admin token file {path} is empty; delete it for a new token") from None
        log.info("admin API token: in %s", path)
        return token
    token = secrets.token_urlsafe(32)
    os.fchmod(fd, 0o600)  # open's mode is masked by the umask
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    log.info("admin API token: generated, in %s", path)
    return token


def resolve_token(config: Config) -> str:
    """The token the admin API accepts (see the module docstring for the order)."""
    if config.admin_token:
        return config.admin_token
    if env := os.environ.get(TOKEN_ENV):
        return env
    if is_db_url(config.db):  # no directory of ours to keep a file in
        raise OSError("the admin API with a PostgreSQL db needs admin_token_file or "
                      f"${TOKEN_ENV}, the same on every instance")
    return _read_or_create(token_path(Path(config.db)))


def check_bearer(authorization: str | None, token: str) -> bool:
    """True if the ``Authorization`` header carries *token*; constant-time in the token."""
    scheme, _, given = (authorization or "").partition(" ")
    # compare_digest on bytes: on str it refuses non-ASCII, which a client could send.
    return scheme.lower() == "bearer" and hmac.compare_digest(
        given.strip().encode(), token.encode()
    )
