"""``trisocks sessions list|kill`` and ``trisocks usage``: the admin API from a shell.

They talk HTTP to a running server (see :mod:`trisocks.cli.admin_client` for where the URL and
token come from) and print tables. Any failure exits with status 2 and a one-line message.
"""

from __future__ import annotations

import argparse
import datetime
from collections.abc import Callable
from typing import Any

from trisocks.admin.tokens import TOKEN_ENV
from trisocks.cli.admin_client import (
    URL_ENV,
    AdminClient,
    AdminError,
    find_token,
    format_table,
)
from trisocks.cli.common import fail
from trisocks.config import default_db_path

__all__ = ["add_admin_commands"]

SESSION_COLUMNS = ("ID", "USER", "CLIENT", "COMMAND", "TARGET", "STATE", "AGE", "UP", "DOWN")
USAGE_COLUMNS = ("USER", "ACTIVE", "SESSIONS", "UP", "DOWN", "DGRAMS_UP", "DGRAMS_DOWN",
                 "LAST_SEEN")


def _age(started_at: str) -> str:
    start = datetime.datetime.fromisoformat(started_at)
    seconds = int((datetime.datetime.now(datetime.UTC) - start).total_seconds())
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _sessions_list(client: AdminClient, args: argparse.Namespace) -> None:
    params = {"user": args.user} if args.user else {}
    sessions = client.call("GET", "/api/sessions", params=params)["sessions"]
    print(format_table(SESSION_COLUMNS, [
        (s["id"], s["user"], s["client"], s["command"], s["target"], s["state"],
         _age(s["started_at"]), s["bytes_up"], s["bytes_down"])
        for s in sessions
    ]))


def _sessions_kill(client: AdminClient, args: argparse.Namespace) -> None:
    client.call("DELETE", f"/api/sessions/{args.id}")
    print(f"killed session {args.id}")


def _usage(client: AdminClient, args: argparse.Namespace) -> None:
    if args.user:
        users = [client.call("GET", f"/api/users/{args.user}")]
    else:
        users = client.call("GET", "/api/users")["users"]
    print(format_table(USAGE_COLUMNS, [
        (u["user"], u["active_sessions"], u["sessions_total"], u["bytes_up"], u["bytes_down"],
         u["datagrams_up"], u["datagrams_down"], u["last_seen"])
        for u in users
    ]))


def _run(
    command: Callable[[AdminClient, argparse.Namespace], None],
) -> Callable[[argparse.Namespace], int]:
    """The subcommand's ``func``: connect, run *command*, turn API errors into exit 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            with AdminClient(args.url, find_token(args.token, args.db)) as client:
                command(client, args)
        except AdminError as exc:
            fail(str(exc))
        return 0

    return run


def _connection_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help=f"admin API base URL (env {URL_ENV}; "
                   "default http://127.0.0.1:8080)")
    p.add_argument("--token", help=f"admin API token (env {TOKEN_ENV}; default: the "
                   "admin-token file next to --db)")
    p.add_argument("--db", default=default_db_path(),  # a str: Path() mangles a URL's //
                   help=f"the server's db, to find its admin-token file "
                   f"(default {default_db_path()})")


def add_admin_commands(sub: Any) -> None:
    """Add ``sessions`` and ``usage`` to the ``trisocks`` subcommands."""
    p = sub.add_parser("sessions", help="list or kill a running server's live sessions")
    commands = p.add_subparsers(dest="sessions_command", required=True, parser_class=type(p))
    q = commands.add_parser("list", help="list live sessions")
    q.add_argument("--user", help="only this user's sessions")
    _connection_flags(q)
    q.set_defaults(func=_run(_sessions_list))
    q = commands.add_parser("kill", help="end one session (its connections close at once)")
    q.add_argument("id", help="session id, as listed")
    _connection_flags(q)
    q.set_defaults(func=_run(_sessions_kill))

    p = sub.add_parser("usage", help="per-user totals of a running server")
    p.add_argument("user", nargs="?", help="only this user")
    _connection_flags(p)
    p.set_defaults(func=_run(_usage))
