"""Files that hold secrets: created 0600 whatever the umask, warned about when others may
read them."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

__all__ = ["create_private", "warn_if_readable"]

log = logging.getLogger("trisocks.store")

def warn_if_readable(path: Path) -> None:
    """Log a warning naming *path* when its group or others may read it (password hashes,
    the admin token)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s is readable by %s (mode %04o); it holds secrets: chmod 600 %s",
                    path, "others" if mode & stat.S_IRWXO else "its group",
                    stat.S_IMODE(mode), path)


def create_private(path: Path) -> None:
    """Create *path* empty with mode 0600 whatever the umask, unless it exists."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
