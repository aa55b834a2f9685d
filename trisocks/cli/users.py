"""``trisocks user add|passwd|remove|list|limits``: the users of a store, edited in place
(SQLite file or PostgreSQL); a running server sees the changes without a restart."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path
from typing import Any

from trisocks.cli.common import Parser, fail, open_user_store
from trisocks.config import default_db_path, is_db_url
from trisocks.identity.model import parse_account
from trisocks.passwords import hash_password
from trisocks.policy.quotas import LIMIT_FIELDS, UserLimits, check_limit, parse_size
from trisocks.store.interface import UserStore
from trisocks.store.records import StoreError
from trisocks.usernames import normalize_username, resolve_username

__all__ = ["add_user_commands"]


def _read_password(args: argparse.Namespace) -> bytes:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line.rstrip("\r\n")
    else:
        try:
            password = getpass.getpass("Password: ")
            again = getpass.getpass("Again: ")
        except EOFError:  # no terminal, and stdin ended
            fail("no password read: input ended (to pipe one in, use --password-stdin)")
        if again != password:
            fail("the two passwords differ")
    raw = password.encode()
    if not 1 <= len(raw) <= 255:
        fail(f"password must be 1..255 bytes (RFC 1929), got {len(raw)}")
    return raw


def _cmd_user(args: argparse.Namespace) -> int:
    given = getattr(args, "name", None)
    if args.user_command == "add":
        try:  # RFC 8265 + one script (trisocks.usernames); refused before any prompt
            args.name = normalize_username(args.name)
        except ValueError as exc:
            fail(str(exc))
    store = open_user_store(args.db)
    try:
        if args.user_command not in ("add", "list"):  # "Alice" is the stored "alice"
            args.name = resolve_username(args.name, store.has_user)
        if args.user_command == "add":
            password = _read_password(args)
            store.add_user(args.name, hash_password(password))
            normalized = f" (normalized from {given!r})" if given != args.name else ""
            print(f"added user {args.name}{normalized}")
        elif args.user_command == "passwd":
            if not store.has_user(args.name):
                raise StoreError(f"no user {args.name!r}")
            store.set_password(args.name, hash_password(_read_password(args)))
            print(f"changed password of {args.name}")
        elif args.user_command == "remove":
            store.remove_user(args.name)
            print(f"removed user {args.name}")
        elif args.user_command == "limits":
            _user_limits(store, args)
        else:
            for name in store.users():
                print(name)
    except StoreError as exc:
        fail(str(exc))
    finally:
        store.close()
    return 0


def _limit_value(field: str, text: str) -> int | float | None:
    if text == "off":
        return None
    try:
        if field == "max_session_duration":
            value: int | float = float(text)
        else:
            value = int(text) if field == "max_sessions" else parse_size(text)
    except ValueError:
        fail(f"--{field.replace('_', '-')}: {text!r} is not a number or size")
    try:
        check_limit(field, value)
    except ValueError as exc:
        fail(f"--{field.replace('_', '-')}: {exc} (or 'off')")
    return value


def _user_limits(store: UserStore, args: argparse.Namespace) -> None:
    """Change the limits given as flags (``off`` clears one), then print all of them.

    A running server applies them within a second (quota and rate) or from the user's next
    request (sessions, duration). *args.name* is a store user or the account of an identity
    from another source (``ldap:alice``, ``gssapi:bob``: it needs no row in the store)."""
    if parse_account(args.name)[0] == "store" and not store.has_user(args.name):
        raise StoreError(f"no user {args.name!r}")
    limits = store.user_limits(args.name)
    changes = {f: _limit_value(f, getattr(args, f)) for f in LIMIT_FIELDS
               if getattr(args, f) is not None}
    if changes:
        limits = UserLimits(**{**limits.as_dict(), **changes})
        store.set_user_limits(args.name, limits)
    for field, value in limits.as_dict().items():
        print(f"{field} {'off' if value is None else value}")


_LIMIT_HELP = {
    "max_sessions": "sessions at once",
    "max_session_duration": "seconds a session may last",
    "rate_up": "bytes/s client to targets (sizes like 512k, 10M)",
    "rate_down": "bytes/s targets to client",
    "quota_day": "bytes per UTC day, both directions (like 5G)",
    "quota_month": "bytes per UTC month, both directions",
}


def _db_arg(text: str) -> Path | str:
    return text if is_db_url(text) else Path(text)


def add_user_commands(sub: Any) -> None:
    """Add ``user`` and its subcommands to the ``trisocks`` subcommands."""
    p = sub.add_parser("user", help="manage users (RFC 1929 username/password)")
    users = p.add_subparsers(dest="user_command", required=True, parser_class=Parser)
    for name, text in (("add", "add a user"), ("passwd", "change a user's password"),
                       ("remove", "remove a user"), ("list", "list users, one per line"),
                       ("limits", "show or set a user's limits and quotas ('off' clears)")):
        q = users.add_parser(name, help=text)
        if name != "list":
            q.add_argument("name")
        if name in ("add", "passwd"):
            q.add_argument("--password-stdin", action="store_true",
                           help="read the password from the first line of stdin")
        if name == "limits":
            for field in LIMIT_FIELDS:
                q.add_argument("--" + field.replace("_", "-"), dest=field, metavar="VALUE",
                               help=_LIMIT_HELP[field])
        q.add_argument("--db", type=_db_arg, default=default_db_path(),
                       help=f"SQLite file or postgresql:// URL (default {default_db_path()})")
        q.set_defaults(func=_cmd_user)
