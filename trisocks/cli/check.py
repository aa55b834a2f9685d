"""``trisocks check``: what ``serve`` with the same options would run with, all problems at
once, with nothing bound (but a test socket per egress address), written or created."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from trisocks.cli.common import fail, log_as_cli_lines, warn
from trisocks.cli.config_flags import add_config_flags, flag_values, serve_warnings
from trisocks.config import ConfigError, config_problems, default_db_path, is_db_url, load_file
from trisocks.server.egress import check_egress
from trisocks.store.records import StoreError
from trisocks.store.sqlite import Store
from trisocks.tls import server_context

__all__ = ["add_check_command"]


def add_check_command(sub: Any) -> None:
    """Add ``check`` to the ``trisocks`` subcommands."""
    p = sub.add_parser(
        "check",
        help="check a configuration without serving",
        description="Check what 'trisocks serve' with the same options would run with: every "
        "key, the access rules (their egress addresses bindable on this host, an egress prefix "
        "locally routed), the admin token file, and the database (opened read-only, never "
        "migrated or created). Nothing is bound but a test socket per egress address (port 0, "
        "closed at once). Prints one line and exits 0 when all is well; else one line per "
        "problem and exit status 2.",
    )
    add_config_flags(p)
    p.set_defaults(func=_cmd_check)


def _cmd_check(args: argparse.Namespace) -> int:
    """``trisocks check``: the config, the rules and the db, all problems at once."""
    log_as_cli_lines()  # what opening the store warns about (file modes)
    try:
        file_values = load_file(args.config) if args.config else {}
    except ConfigError as exc:
        fail(str(exc))
    config, problems = config_problems(file_values, flag_values(args))
    if config is not None:
        try:
            server_context(config)  # the TLS files load
        except ConfigError as exc:
            problems.append(str(exc))
        problems += _db_problems(config.db)
        problems += check_egress(config)  # the rules' source addresses work on this host
        for warning in serve_warnings(args, config):
            warn(warning)
    if problems:
        for problem in problems:
            print(f"trisocks: error: {problem}", file=sys.stderr)
        return 2
    assert config is not None
    listeners, rules = len(config.listen), len(config.rules)
    print(f"configuration OK: {listeners} listener{'s' * (listeners != 1)}, "
          f"{rules} rule{'s' * (rules != 1)}, db {_db_label(config.db)}")
    return 0


def _db_label(db: Path | str) -> str:
    if not is_db_url(db):
        return str(db)
    from trisocks.store.postgres import _safe

    return str(_safe(str(db)))


def _db_problems(db: Path | str) -> list[str]:
    """The db opened read-only, as ``serve`` would find it; nothing written or created. An
    SQLite file that does not exist yet is no problem where ``serve`` can create it."""
    if is_db_url(db):
        return _postgres_problems(str(db))
    path = Path(db)
    if not path.exists():
        if path.parent.is_dir() or db == default_db_path():
            return []  # serve creates it (and, for the default path, its directory)
        return [f"db: database directory {path.parent} does not exist"]
    try:
        Store(path, read_only=True).close()
    except StoreError as exc:
        return [f"db: {exc}"]
    return []


def _postgres_problems(url: str) -> list[str]:
    try:
        import psycopg
    except ImportError:
        return ["db: a postgresql:// db needs the optional extra: pip install "
                "'trisocks[postgresql]'"]
    from trisocks.store.postgres import MIGRATIONS

    try:
        with psycopg.connect(url, connect_timeout=10,
                             options="-c default_transaction_read_only=on") as conn:
            exists = conn.execute("SELECT to_regclass('schema_migrations')").fetchone()
            rows = conn.execute("SELECT version FROM schema_migrations WHERE component = "
                                "'store'").fetchall() if exists and exists[0] else []
    except psycopg.Error as exc:
        message = " ".join(str(exc).split())  # one line
        return [f"db: cannot open {_db_label(url)}: {message}"]
    if rows and rows[0][0] > len(MIGRATIONS):
        return [f"db: the database's store schema is version {rows[0][0]}; this trisocks "
                f"knows up to {len(MIGRATIONS)}: upgrade trisocks"]
    return []  # an empty database, or one serve migrates on start
