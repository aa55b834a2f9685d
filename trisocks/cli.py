"""``trisocks``: serve, check a configuration, manage users, and talk to a running server's
admin API.

Bad input never gets a traceback: the message names the problem and the exit status is 2.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import logging
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import trio

from trisocks.config import (
    KEYS,
    Config,
    ConfigError,
    build_config,
    config_problems,
    config_warnings,
    default_db_path,
    is_db_url,
    load_file,
)
from trisocks.fleet.workers import supervise, worker_index
from trisocks.logs import escape_unprintable, setup_logging
from trisocks.passwords import hash_password
from trisocks.policy.quotas import LIMIT_FIELDS, UserLimits, check_limit, parse_size
from trisocks.store.interface import UserStore
from trisocks.store.open import open_store
from trisocks.store.records import StoreError
from trisocks.store.sqlite import Store
from trisocks.tls import server_context
from trisocks.usernames import normalize_username, resolve_username

__all__ = ["main"]

# Help for every config key; each is also a flag of ``trisocks serve``.
SERVE_HELP: dict[str, tuple[str, str]] = {
    "listen": ("HOST:PORT", "SOCKS listener; repeat for more; IPv6 as [::1]:1080; "
               "tls://HOST:PORT for one inside TLS (default 127.0.0.1:1080)"),
    "auth": ("METHODS", "comma list of methods to offer, in order of preference: "
             "password, gssapi, none (default password)"),
    "protocols": ("LIST", "comma list of what every listener serves, told apart by the first "
                  "byte: socks5, socks4, http (default socks5,socks4,http)"),
    "db": ("PATH|URL", "SQLite file for users and accounting, or postgresql://... shared by "
           f"a fleet of instances (default {default_db_path()})"),
    "allow_open_proxy": ("", "allow auth 'none' on a non-loopback listener"),
    "handshake_timeout": ("SECONDS", "greeting + auth + request must finish within this "
                          "(default 10)"),
    "connect_timeout": ("SECONDS", "outbound connect timeout; answered with REP 06 (default 10)"),
    "idle_timeout": ("SECONDS", "end a relay idle this long in both directions (default 300)"),
    "shutdown_grace": ("SECONDS", "on SIGINT/SIGTERM, let sessions drain this long (default 10)"),
    "bind_timeout": ("SECONDS", "BIND: wait this long for the incoming peer (default 120)"),
    "udp_idle_timeout": ("SECONDS", "UDP ASSOCIATE: end an association idle this long "
                         "(default 300)"),
    "udp_reassembly_timeout": ("SECONDS", "UDP fragment reassembly timer, >= 5 (default 5)"),
    "external_address": ("ADDR", "address announced in BIND/UDP replies (behind NAT)"),
    "relay_engine": ("ENGINE", "auto, splice or copy (default auto: splice on Linux)"),
    "admin": ("HOST:PORT", "admin API and dashboard, or 'off' (default 127.0.0.1:8080)"),
    "admin_token": ("TOKEN", "admin API bearer token; on the command line every local user "
                    "can read it in the process list: prefer admin_token_file or env "
                    "TRISOCKS_ADMIN_TOKEN (generated and stored next to the db when none is set)"),
    "admin_token_file": ("FILE", "file holding the admin API bearer token, one line; "
                         "keep it mode 600 (a warning says when group or others can read it)"),
    "metrics_public": ("", "serve /metrics without the token"),
    "log_format": ("FORMAT", "text or json (default text)"),
    "log_level": ("LEVEL", "debug, info, warning or error (default info)"),
    "accounting_flush_interval": ("SECONDS", "how often live counters are written to the db "
                                  "(default 2)"),
    "max_sessions": ("N", "sessions at once; more connections are closed (default 10000)"),
    "gss_keytab": ("PATH", "GSSAPI: keytab with the service's keys (default $KRB5_KTNAME, "
                   "else the system keytab)"),
    "gss_service": ("NAME", "GSSAPI: service name; clients ask for NAME/<proxy host>@REALM "
                    "(default socks)"),
    "gss_level": ("LEVELS", "GSSAPI protection levels accepted: 1 integrity, 2 confidentiality, "
                  "or 1,2 (default 1,2)"),
    "rules": ("FILE", "access rules: a TOML file of [[rules]] tables (in the config file, "
              "[[rules]] may also be written inline); default: allow all but the admin "
              "endpoint, the proxy host itself to clients elsewhere, and link-local addresses"),
    "rules_default": ("ACTION", "allow or deny what no rule matches (default allow)"),
    "groups": ("GROUPS", "user groups for rules, as NAME=USER,USER;NAME=USER (in the file: "
               "a [groups] table)"),
    "max_sessions_per_user": ("N", "sessions at once per user; more get REP 02 (default off)"),
    "max_handshakes": ("N", "handshakes in flight; over it the oldest unfinished one is closed "
                       "(default 1000)"),
    "max_handshakes_per_client": ("N", "handshakes in flight per client IP (IPv6: per /64); "
                                  "over it that client's oldest unfinished one is closed; "
                                  "'off' for none (default 64)"),
    "max_binds_per_user": ("N", "BIND listeners at once per user (no auth: per client IP or "
                           "IPv6 /64); more get REP 02; 'off' for none (default 16)"),
    "max_udp_per_user": ("N", "UDP associations at once per user (no auth: per client IP or "
                         "IPv6 /64); more get REP 02; 'off' for none (default 16)"),
    "udp_sockets": ("N", "UDP sockets server-wide, 2 per association; over it UDP ASSOCIATE "
                    "gets REP 01 (default 2000)"),
    "connection_rate": ("PER_SECOND", "new connections per second per client IP, bursts "
                        "of twice that; more are closed (default off)"),
    "auth_failure_limit": ("N", "failed logins in a row per client IP before it must wait "
                           "1 s, doubling per failure; 'off' to disable (default 5)"),
    "auth_backoff_max": ("SECONDS", "longest wait after failed logins (default 300)"),
    "auth_backoff_exempt": ("CIDRS", "comma list of client networks never put in auth backoff "
                            "(default 127.0.0.0/8,::1; '' for none)"),
    "max_session_duration": ("SECONDS", "end sessions after this long (default off)"),
    "workers": ("N", "processes sharing the listeners with SO_REUSEPORT, restarted if they "
                "crash; the admin API runs in the first (default 1)"),
    "proxy_protocol": ("", "listeners expect a PROXY protocol v1/v2 header (HAProxy "
                       "send-proxy/send-proxy-v2) and refuse connections without one"),
    "tls_cert": ("FILE", "PEM certificate chain of tls:// listeners; re-read on reload"),
    "tls_key": ("FILE", "PEM private key of tls:// listeners; re-read on reload"),
    "tls_client_ca": ("FILE", "PEM CA bundle: TLS clients must present a certificate it "
                      "verifies, and its subject CN is the user, no password (default off)"),
}
assert SERVE_HELP.keys() == KEYS.keys(), "every config key needs a flag"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"trisocks: error: {message}\n")


def fail(message: str) -> NoReturn:
    """Print one error line naming the problem and exit with status 2 (every CLI command)."""
    print(f"trisocks: error: {message}", file=sys.stderr)
    sys.exit(2)


def _add_serve(sub: Any) -> None:
    p = sub.add_parser(
        "serve",
        help="run the proxy",
        description="Run the SOCKS5 proxy. Every option is also a key of the TOML file given "
        "with --config (same name with underscores: --idle-timeout is idle_timeout); "
        "options on the command line win over the file.",
    )
    _add_config_flags(p)
    p.set_defaults(func=_cmd_serve)


def _add_check(sub: Any) -> None:
    p = sub.add_parser(
        "check",
        help="check a configuration without serving",
        description="Check what 'trisocks serve' with the same options would run with: every "
        "key, the access rules, the admin token file, and the database (opened read-only, "
        "never migrated or created). Nothing is bound. Prints one line and exits 0 when all "
        "is well; else one line per problem and exit status 2.",
    )
    _add_config_flags(p)
    p.set_defaults(func=_cmd_check)


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    """--config and a flag for every config key (``serve`` and ``check``)."""
    p.add_argument("--config", type=Path, metavar="FILE", help="TOML config file")
    for key, (metavar, text) in SERVE_HELP.items():
        flag = "--" + key.replace("_", "-")
        if not metavar:
            p.add_argument(flag, dest=key, action="store_const", const=True, help=text)
        elif key == "listen":
            p.add_argument(flag, dest=key, action="append", metavar=metavar, help=text)
        else:
            p.add_argument(flag, dest=key, metavar=metavar, help=text)
    p.add_argument("--no-admin", dest="admin", action="store_const", const="off",
                   help="do not start the admin API")


_INTEGER = {"max_sessions", "max_sessions_per_user", "max_handshakes", "auth_failure_limit",
            "workers", "max_handshakes_per_client", "max_binds_per_user", "max_udp_per_user",
            "udp_sockets"}
_NUMERIC = _INTEGER | {
    key for key in KEYS
    if key.endswith(("_timeout", "_grace", "_interval", "_rate", "_max", "_duration"))
}


def _flag_values(args: argparse.Namespace) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for key in KEYS:
        value = getattr(args, key, None)
        if value is not None and key in _NUMERIC and value != "off":
            try:
                value = int(value) if key in _INTEGER else float(value)
            except ValueError:
                fail(f"--{key.replace('_', '-')}: {value!r} is not a number")
        values[key] = value
    return values


def read_config(args: argparse.Namespace) -> Config:
    """The config from the file (read now) and the flags.

    Raises:
        ConfigError: naming the key at fault.
    """
    file_values = load_file(args.config) if args.config else {}
    return build_config(file_values, _flag_values(args))


def load_config(args: argparse.Namespace) -> Config:
    try:
        return read_config(args)
    except ConfigError as exc:
        fail(str(exc))


def _open_store(db: Path | str, *, serving: bool = False) -> UserStore:
    try:
        return open_store(db, create_dir=db == default_db_path(), serving=serving)
    except StoreError as exc:
        fail(str(exc))


def _db_arg(text: str) -> Path | str:
    return text if is_db_url(text) else Path(text)


def _warn(message: str) -> None:
    print(f"trisocks: warning: {message}", file=sys.stderr)


def _config_warnings(args: argparse.Namespace, config: Config) -> list[str]:
    warnings = config_warnings(config)
    if getattr(args, "admin_token", None) is not None:
        warnings.append("--admin-token: a token on the command line is visible to every local "
                        "user in the process list; use admin_token_file or $TRISOCKS_ADMIN_TOKEN")
    return warnings


def _cmd_serve(args: argparse.Namespace) -> int:
    config = load_config(args)
    try:
        server_context(config)  # the TLS files load: one line now, not a traceback later
    except ConfigError as exc:
        fail(str(exc))
    if worker_index() is None:  # once, not again from every worker
        for warning in _config_warnings(args, config):
            _warn(warning)
    setup_logging(config.log_format, config.log_level)
    if config.workers > 1 and worker_index() is None:
        _open_store(config.db).close()  # fail here, once; and migrate before workers race
        return supervise(config, args.argv)
    store = _open_store(config.db, serving=True)
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


def _cmd_check(args: argparse.Namespace) -> int:
    """``trisocks check``: the config, the rules and the db, all problems at once."""
    _log_as_cli_lines()  # what opening the store warns about (file modes)
    try:
        file_values = load_file(args.config) if args.config else {}
    except ConfigError as exc:
        fail(str(exc))
    config, problems = config_problems(file_values, _flag_values(args))
    if config is not None:
        try:
            server_context(config)  # the TLS files load
        except ConfigError as exc:
            problems.append(str(exc))
        problems += _db_problems(config.db)
        for warning in _config_warnings(args, config):
            _warn(warning)
    if problems:
        for problem in problems:
            print(f"trisocks: error: {problem}", file=sys.stderr)
        return 2
    assert config is not None
    listeners, rules = len(config.listen), len(config.rules)
    print(f"configuration OK: {listeners} listener{'s' * (listeners != 1)}, "
          f"{rules} rule{'s' * (rules != 1)}, db {_db_label(config.db)}")
    return 0


class _CliFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"trisocks: {record.levelname.lower()}: {escape_unprintable(record.getMessage())}"


def _log_as_cli_lines() -> None:
    """Warnings logged while checking, as ``trisocks: warning: ...`` lines on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_CliFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)


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
    from trisocks.server.reload import reload_config
    from trisocks.server.serve import serve

    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            ctx = await nursery.start(serve, config, store)
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


# --- users -------------------------------------------------------------------------------


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
    store = _open_store(args.db)
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
    request (sessions, duration)."""
    if not store.has_user(args.name):
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


def _add_user(sub: Any) -> None:
    p = sub.add_parser("user", help="manage users (RFC 1929 username/password)")
    users = p.add_subparsers(dest="user_command", required=True, parser_class=_Parser)
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


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="trisocks", description="SOCKS5 proxy on trio")
    parser.add_argument("--version", action="version", version=f"trisocks {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_serve(sub)
    _add_check(sub)
    _add_user(sub)
    try:
        from trisocks.admin.cli import add_admin_commands
    except ImportError:  # the admin client commands arrive with the admin API
        pass
    else:
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
