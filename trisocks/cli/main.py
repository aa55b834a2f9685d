"""``trisocks``: serve, check a configuration, manage users, and talk to a running server's
admin API.

Bad input never gets a traceback: the message names the problem and the exit status is 2.
"""

from __future__ import annotations

import argparse
import sys

from trisocks.cli.admin import add_admin_commands
from trisocks.cli.check import add_check_command
from trisocks.cli.common import Parser
from trisocks.cli.serve import add_serve_command
from trisocks.cli.users import add_user_commands

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The ``trisocks`` parser with every subcommand; each sets ``func`` to run it."""
    parser = Parser(prog="trisocks", description="SOCKS5 proxy on trio")
    parser.add_argument("--version", action="version", version=f"trisocks {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_serve_command(sub)
    add_check_command(sub)
    add_user_commands(sub)
    add_admin_commands(sub)
    return parser


def _version() -> str:
    """The installed distribution's version; the package's own when run from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    from trisocks import __version__

    try:
        return version("trisocks")
    except PackageNotFoundError:
        return __version__


def main(argv: list[str] | None = None) -> int:
    """Run the ``trisocks`` command with *argv* (default: ``sys.argv[1:]``); return the exit
    status. Bad input exits with status 2 and one line on stderr."""
    args = build_parser().parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv  # what --workers runs again
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
