"""``trisocks serve``: run the proxy until SIGINT or SIGTERM (SIGHUP reloads), in one process
or a supervised fleet of workers; a socket or file it cannot open stops it with one line."""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
from collections.abc import Callable
from typing import Any

import trio

from trisocks.cli.common import fail, open_user_store, warn
from trisocks.cli.config_flags import add_config_flags, load_config, read_config, serve_warnings
from trisocks.config import Config, ConfigError
from trisocks.fleet.workers import supervise, worker_index
from trisocks.logs import setup_logging
from trisocks.server.egress import check_egress
from trisocks.store.interface import UserStore
from trisocks.tls import server_context

__all__ = ["add_serve_command"]


def add_serve_command(sub: Any) -> None:
    """Add ``serve`` to the ``trisocks`` subcommands."""
    p = sub.add_parser(
        "serve",
        help="run the proxy",
        description="Run the SOCKS5 proxy. Every option is also a key of the TOML file given "
        "with --config (same name with underscores: --idle-timeout is idle_timeout); "
        "options on the command line win over the file.",
    )
    add_config_flags(p)
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    config = load_config(args)
    try:
        server_context(config)  # the TLS files load: one line now, not a traceback later
    except ConfigError as exc:
        fail(str(exc))
    for problem in (egress_problems := check_egress(config)):  # the rules' source addresses
        print(f"trisocks: error: {problem}", file=sys.stderr)
    if egress_problems:
        return 2
    if worker_index() is None:  # once, not again from every worker
        for warning in serve_warnings(args, config):
            warn(warning)
    setup_logging(config.log_format, config.log_level)
    if config.workers > 1 and worker_index() is None:
        open_user_store(config.db).close()  # fail here, once; and migrate before workers race
        return supervise(config, args.argv)
    store = open_user_store(config.db, serving=True)
    if "password" in config.auth and not store.users():
        print(
            f"trisocks: warning: no users in {config.db}; add one with "
            f"'trisocks user add NAME --db {config.db}'",
            file=sys.stderr,
        )
    try:
        trio.run(_run_until_signal, config, store, lambda: read_config(args))
    except (OSError, ExceptionGroup) as exc:
        if (error := _os_error(exc)) is None:
            raise
        fail(_startup_error(error))
    finally:
        store.close()
    return 0


def _startup_error(error: OSError) -> str:
    """The one line for an OSError that stopped ``serve``: a socket that cannot be bound,
    or a file it needs (the admin token) named with its path."""
    if error.filename is not None:
        return f"cannot start: {error.filename}: {error.strerror}"
    if error.errno is None:  # raised with a message of our own
        return f"cannot start: {error}"
    return f"cannot listen: {error.strerror or error}"


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError *exc* is, or the one its nested groups hold (trio's nurseries wrap what a
    task raises, so a port in use arrives as a group of one)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc if isinstance(exc, OSError) else None


async def _run_until_signal(
    config: Config, store: UserStore, reread: Callable[[], Config]
) -> None:
    """Serve until SIGINT or SIGTERM; SIGHUP reloads (a broken config is logged and ignored)."""
    from trisocks.admin.server import serve_with_admin
    from trisocks.server.reload import reload_config

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            ctx = await nursery.start(serve_with_admin, config, store)
            ctx.load_config = reread

            async def watch() -> None:
                async for signum in signals:
                    if signum != signal.SIGHUP:
                        ctx.shutdown.set()
                        return
                    with contextlib.suppress(ConfigError):  # logged; the old config stays
                        reload_config(ctx)

            nursery.start_soon(watch)
            await ctx.shutdown.wait()
    # serve has returned: every session is done and accounting is flushed.
