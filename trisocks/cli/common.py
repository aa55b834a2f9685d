"""What every ``trisocks`` command shares: a parser whose errors are one line and exit status
2, the ``trisocks: error:`` and ``trisocks: warning:`` lines on stderr, and opening the user
store a command names with ``--db``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import NoReturn

from trisocks.config import default_db_path
from trisocks.logs import escape_unprintable
from trisocks.store.interface import UserStore
from trisocks.store.open import open_store
from trisocks.store.records import StoreError

__all__ = ["Parser", "fail", "log_as_cli_lines", "open_user_store", "warn"]


class Parser(argparse.ArgumentParser):
    """The parser of ``trisocks`` and its subcommands: bad arguments print the usage and one
    ``trisocks: error:`` line, and exit with status 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"trisocks: error: {message}\n")


def fail(message: str) -> NoReturn:
    """Print one error line naming the problem and exit with status 2 (every CLI command)."""
    print(f"trisocks: error: {message}", file=sys.stderr)
    sys.exit(2)


def warn(message: str) -> None:
    """Print one ``trisocks: warning:`` line on stderr."""
    print(f"trisocks: warning: {message}", file=sys.stderr)


def open_user_store(db: Path | str, *, serving: bool = False) -> UserStore:
    """The store at *db* (the default path's directory is created); a failure exits 2."""
    try:
        return open_store(db, create_dir=db == default_db_path(), serving=serving)
    except StoreError as exc:
        fail(str(exc))


class _CliFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"trisocks: {record.levelname.lower()}: {escape_unprintable(record.getMessage())}"


def log_as_cli_lines() -> None:
    """Warnings logged while checking, as ``trisocks: warning: ...`` lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CliFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
