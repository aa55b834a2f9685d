"""Server configuration: one frozen :class:`Config`, from defaults, a TOML file and flags.

Every key of the TOML file is also a ``trisocks serve`` flag (``idle_timeout`` is
``--idle-timeout``); flags win over the file. :func:`build_config` validates everything and
raises :class:`ConfigError` naming the key at fault.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from trisocks.policy.rules import DEFAULT_RULES, Rule, RuleError, groups_used, parse_rules

__all__ = [
    "KEYS", "Config", "ConfigError", "Endpoint", "build_config", "config_problems",
    "config_warnings", "default_db_path", "is_db_url", "read_token_file",
]


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A configuration value is wrong; the message names the key."""


@attrs.frozen
class Endpoint:
    """A host and port to listen on or to bind."""

    host: str
    port: int
    tls: bool = False
    """A TLS listener (``tls://HOST:PORT`` in ``listen``): every protocol inside TLS."""

    @classmethod
    def parse(cls, text: str, *, key: str = "listen") -> Endpoint:
        """Parse ``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces is never implied:
        an empty host means 127.0.0.1); in ``listen``, ``tls://`` in front makes a TLS
        listener."""
        tls = key == "listen" and text.startswith("tls://")
        if tls:
            text = text.removeprefix("tls://")
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"{key}: {text!r} is not HOST:PORT")
        if host.startswith("["):
            if not host.endswith("]"):
                raise ConfigError(f"{key}: {text!r} has an unclosed '['")
            host = host[1:-1]
        elif ":" in host:
            raise ConfigError(f"{key}: write IPv6 addresses in brackets, as [::1]:1080")
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"{key}: port {port_text!r} is not a number") from None
        if not 0 <= port <= 65535:
            raise ConfigError(f"{key}: port {port} is out of range 0..65535")
        return cls(host or "127.0.0.1", port, tls)

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return f"tls://{address}" if self.tls else address


AUTH_METHODS = ("none", "password", "gssapi")
GSS_LEVELS = (1, 2)
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
RELAY_ENGINES = ("auto", "splice", "copy")


def default_db_path() -> Path:
    """``$XDG_DATA_HOME/trisocks/trisocks.db`` (``~/.local/share/...`` without it)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local/share")
    return Path(base) / "trisocks" / "trisocks.db"


@attrs.frozen
class Config:
    """Everything ``trisocks serve`` needs. Times are seconds."""

    listen: tuple[Endpoint, ...] = (Endpoint("127.0.0.1", 1080),)
    """SOCKS listeners."""
    auth: tuple[str, ...] = ("password",)
    """Methods offered, in the server's order of preference: ``none``, ``password``,
    ``gssapi``."""
    protocols: tuple[str, ...] = ("socks5", "socks4", "http")
    """What every listener serves, told apart by the first byte (docs/protocols.md)."""
    db: Path | str = attrs.field(factory=default_db_path)
    """SQLite file with users and accounting, or a ``postgresql://`` URL: then users,
    accounting and live sessions are shared by every instance on it (:mod:`trisocks.fleet`)."""
    allow_open_proxy: bool = False
    """Allow ``auth = none`` on a listener that is not loopback."""
    handshake_timeout: float = 10.0
    """Greeting + authentication + request must finish within this."""
    connect_timeout: float = 10.0
    """Outbound connect (all addresses of a name together)."""
    idle_timeout: float = 300.0
    """A relay with no byte in either direction for this long ends."""
    shutdown_grace: float = 10.0
    """On SIGINT/SIGTERM, live sessions get this long to finish before they are cancelled."""
    bind_timeout: float = 120.0
    """BIND: how long to wait for the peer's incoming connection."""
    udp_idle_timeout: float = 300.0
    """UDP ASSOCIATE: an association with no datagram for this long ends."""
    udp_reassembly_timeout: float = 5.0
    """UDP fragment reassembly timer (RFC 1928: no less than 5 s)."""
    external_address: str | None = None
    """Address announced in BIND/UDP replies instead of the local one (behind NAT)."""
    relay_engine: str = "auto"
    """``auto`` (splice on Linux), ``splice`` or ``copy``."""
    admin: Endpoint | None = Endpoint("127.0.0.1", 8080)
    """Admin API and dashboard; ``None`` (``--no-admin``) turns it off."""
    admin_token: str | None = None
    """Bearer token for the admin API; generated and stored next to the db when unset. With
    :attr:`admin_token_file`, the token read from that file."""
    admin_token_file: Path | None = None
    """A file holding the admin token (one line), read when the config is built: the way to
    keep the secret out of the command line and the config file."""
    metrics_public: bool = False
    """Serve ``/metrics`` without the token."""
    log_format: str = "text"
    """``text`` or ``json``."""
    log_level: str = "info"
    accounting_flush_interval: float = 2.0
    """Seconds between flushes of live counters into the accounting store."""
    max_sessions: int = 10000
    """Sessions at once, server-wide; beyond it new connections are closed at once."""
    gss_keytab: Path | None = None
    """GSSAPI: keytab with the service's keys; ``None``: ``KRB5_KTNAME`` or the system one."""
    gss_service: str = "socks"
    """GSSAPI: service name; clients ask for ``<service>/<proxy host>@REALM``."""
    gss_level: tuple[int, ...] = GSS_LEVELS
    """GSSAPI protection levels accepted (RFC 1961 §4): 1 integrity, 2 confidentiality."""
    rules: tuple[Rule, ...] = parse_rules(DEFAULT_RULES)
    """Access rules, first match wins (:mod:`trisocks.policy.rules`); TOML ``[[rules]]`` or a
    file of them. The shipped ones deny the admin endpoint, the proxy host itself (``@local``)
    to clients not on it, and link-local addresses."""
    rules_default: str = "allow"
    """What a request no rule matches gets: ``allow`` or ``deny``."""
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """User groups for rules' ``users = ["@name"]``."""
    max_sessions_per_user: int | None = None
    """Sessions at once per user (a user's own limit in the store wins); more get REP 02."""
    max_handshakes: int = 1000
    """Connections still in their handshake at once; over it, the oldest unfinished one is
    closed to make room."""
    max_handshakes_per_client: int | None = 64
    """Handshakes in flight per client IP (IPv6: per /64); over it, that client's oldest
    unfinished one is closed to make room."""
    max_binds_per_user: int | None = 16
    """BIND listeners at once per user (unauthenticated: per client IP or IPv6 /64); more
    get REP 02."""
    max_udp_per_user: int | None = 16
    """UDP associations at once per user (unauthenticated: per client IP or IPv6 /64); more
    get REP 02."""
    udp_sockets: int = 2000
    """UDP sockets server-wide; each association reserves 2 (client side, outbound); over
    it, UDP ASSOCIATE gets REP 01."""
    connection_rate: float | None = None
    """New connections per second per client IP (bursts up to twice that); more are closed."""
    auth_failure_limit: int | None = 5
    """Failed logins in a row from one IP before it must wait (1 s, doubling per failure)."""
    auth_backoff_max: float = 300.0
    """The longest an IP waits after failed logins, and how long failures are remembered."""
    auth_backoff_exempt: tuple[IPNetwork, ...] = (
        ipaddress.ip_network("127.0.0.0/8"),
        ipaddress.ip_network("::1/128"),
    )
    """Client networks never put in auth backoff: by default loopback, where one bad local
    client would otherwise lock out every local user (and every test probe)."""
    max_session_duration: float | None = None
    """Seconds a session may last (a user's own limit in the store wins)."""
    workers: int = 1
    """Processes serving the same listeners (``SO_REUSEPORT``), supervised by the first one."""
    proxy_protocol: bool = False
    """SOCKS listeners expect a PROXY protocol v1/v2 header (HAProxy ``send-proxy-v2``) and
    refuse connections without one."""
    tls_cert: Path | None = None
    """PEM certificate chain of ``tls://`` listeners (re-read on reload)."""
    tls_key: Path | None = None
    """PEM private key of ``tls://`` listeners (re-read on reload)."""
    tls_client_ca: Path | None = None
    """PEM CA bundle: when set, TLS clients must present a certificate it verifies; the
    certificate's subject CN is the session's user, with no password."""


def _positive(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a number of seconds, got {value!r}")
    if not math.isfinite(value):  # TOML and float() take nan and inf; trio refuses a NaN deadline
        raise ConfigError(f"{key}: must be a finite number, got {value}")
    if value <= 0:
        raise ConfigError(f"{key}: must be greater than 0, got {value}")
    return float(value)


def _choice(choices: tuple[str, ...]) -> Any:
    def convert(key: str, value: Any) -> str:
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return convert


def _bool(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def _listen(key: str, value: Any) -> tuple[Endpoint, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ConfigError(f"{key}: expected one or more HOST:PORT strings")
    if not all(isinstance(item, str) for item in items):
        raise ConfigError(f"{key}: expected HOST:PORT strings, got {value!r}")
    return tuple(Endpoint.parse(item, key=key) for item in items)


def _auth(key: str, value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ConfigError(f"{key}: expected a list of methods")
    methods = tuple(str(item).strip() for item in items)
    for method in methods:
        if method not in AUTH_METHODS:
            raise ConfigError(
                f"{key}: unknown method {method!r} (known: {', '.join(AUTH_METHODS)})"
            )
    if len(set(methods)) != len(methods):
        raise ConfigError(f"{key}: a method is listed twice")
    return methods


PROTOCOLS = ("socks5", "socks4", "http")


def _protocols(key: str, value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ConfigError(f"{key}: expected a list of protocols")
    names = tuple(str(item).strip().lower() for item in items)
    for name in names:
        if name not in PROTOCOLS:
            raise ConfigError(f"{key}: unknown protocol {name!r} (known: {', '.join(PROTOCOLS)})")
    if len(set(names)) != len(names):
        raise ConfigError(f"{key}: a protocol is listed twice")
    return names


def _gss_level(key: str, value: Any) -> tuple[int, ...]:
    items = str(value).split(",") if isinstance(value, str | int) else value
    if not isinstance(items, list | tuple) or not items:
        raise ConfigError(f"{key}: expected 1, 2 or \"1,2\", got {value!r}")
    levels = {str(item).strip() for item in items}
    if not levels <= {"1", "2"}:
        raise ConfigError(
            f"{key}: expected levels 1 (integrity) and/or 2 (confidentiality), got {value!r}"
        )
    return tuple(sorted(int(level) for level in levels))


def _admin(key: str, value: Any) -> Endpoint | None:
    if value in (None, False, "off", "none"):
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected HOST:PORT or \"off\", got {value!r}")
    return Endpoint.parse(value, key=key)


def _text(key: str, value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def is_db_url(db: Path | str) -> bool:
    """A PostgreSQL URL rather than an SQLite file path."""
    return isinstance(db, str) and db.startswith(("postgresql://", "postgres://"))


def _db(key: str, value: Any) -> Path | str:
    if isinstance(value, str) and is_db_url(value):
        return value
    return _path(key, value)


def _path(key: str, value: Any) -> Path:
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise ConfigError(f"{key}: expected a file path, got {value!r}")
    return Path(value).expanduser()


def _count(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key}: expected a whole number >= 1, got {value!r}")
    return value


def _limit(key: str, value: Any) -> int | None:
    """A count, or ``off`` (also 0) for no limit."""
    if value in ("off", 0):
        return None
    return _count(key, value)


def _optional_positive(key: str, value: Any) -> float | None:
    return None if value in ("off", 0) else _positive(key, value)


def _rules(key: str, value: Any) -> tuple[Rule, ...]:
    """A list of rule tables, or the path of a TOML file holding ``[[rules]]``."""
    if isinstance(value, str | os.PathLike):
        path = _path(key, value)
        try:
            with open(path, "rb") as f:
                value = tomllib.load(f).get("rules", [])
        except OSError as exc:
            raise ConfigError(f"{key}: cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{key}: {path} is not valid TOML: {exc}") from None
    try:
        return parse_rules(value)
    except RuleError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _groups(key: str, value: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A TOML table ``{staff = ["alice", "bob"]}``, or ``staff=alice,bob;ops=carol``."""
    if isinstance(value, str):
        pairs = [part.partition("=") for part in value.split(";") if part.strip()]
        if not all(sep for _, sep, _ in pairs):
            raise ConfigError(f"{key}: expected NAME=USER,USER;NAME=USER, got {value!r}")
        value = {name.strip(): users.split(",") for name, _, users in pairs}
    if not isinstance(value, Mapping) or not all(
        isinstance(users, list) and all(isinstance(u, str) for u in users)
        for users in value.values()
    ):
        raise ConfigError(f"{key}: expected a table of user lists, got {value!r}")
    return tuple(
        (str(name), tuple(u.strip() for u in users)) for name, users in sorted(value.items())
    )


def _networks(key: str, value: Any) -> tuple[IPNetwork, ...]:
    items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ConfigError(f"{key}: expected a list of networks (CIDR), got {value!r}")
    try:
        return tuple(ipaddress.ip_network(str(item).strip(), strict=False) for item in items)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def _reassembly(key: str, value: Any) -> float:
    seconds = _positive(key, value)
    if seconds < 5:
        raise ConfigError(f"{key}: RFC 1928 requires at least 5 seconds, got {value}")
    return seconds


KEYS: Mapping[str, Any] = {
    "listen": _listen,
    "auth": _auth,
    "protocols": _protocols,
    "db": _db,
    "allow_open_proxy": _bool,
    "handshake_timeout": _positive,
    "connect_timeout": _positive,
    "idle_timeout": _positive,
    "shutdown_grace": _positive,
    "bind_timeout": _positive,
    "udp_idle_timeout": _positive,
    "udp_reassembly_timeout": _reassembly,
    "external_address": _text,
    "relay_engine": _choice(RELAY_ENGINES),
    "admin": _admin,
    "admin_token": _text,
    "admin_token_file": _path,
    "metrics_public": _bool,
    "log_format": _choice(LOG_FORMATS),
    "log_level": _choice(LOG_LEVELS),
    "accounting_flush_interval": _positive,
    "max_sessions": _count,
    "gss_keytab": _path,
    "gss_service": _text,
    "gss_level": _gss_level,
    "rules": _rules,
    "rules_default": _choice(("allow", "deny")),
    "groups": _groups,
    "max_sessions_per_user": _limit,
    "max_handshakes": _count,
    "max_handshakes_per_client": _limit,
    "max_binds_per_user": _limit,
    "max_udp_per_user": _limit,
    "udp_sockets": _count,
    "connection_rate": _optional_positive,
    "auth_failure_limit": _limit,
    "auth_backoff_max": _positive,
    "auth_backoff_exempt": _networks,
    "max_session_duration": _optional_positive,
    "workers": _count,
    "proxy_protocol": _bool,
    "tls_cert": _path,
    "tls_key": _path,
    "tls_client_ca": _path,
}
"""Every config key with its converter: ``converter(key, raw_value) -> value``."""


def load_file(path: Path) -> dict[str, Any]:
    """Read a TOML config file; unknown keys are errors (a typo must not pass silently)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config: file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    for key in data:
        if key not in KEYS:
            raise ConfigError(f"{key}: unknown config key in {path}")
    return data


def build_config(file_values: Mapping[str, Any], flag_values: Mapping[str, Any]) -> Config:
    """Defaults, then the file, then flags (``None`` flags are "not given")."""
    merged = dict(file_values)
    merged.update({k: v for k, v in flag_values.items() if v is not None})
    values = {key: KEYS[key](key, raw) for key, raw in merged.items()}
    config = Config(**values)
    _check(config)
    if config.admin_token_file is not None:
        if config.admin_token is not None:
            raise ConfigError("admin_token_file: give admin_token or admin_token_file, not both")
        config = attrs.evolve(config, admin_token=read_token_file(config.admin_token_file))
    return config


def config_problems(
    file_values: Mapping[str, Any], flag_values: Mapping[str, Any]
) -> tuple[Config | None, list[str]]:
    """Like :func:`build_config`, but every key's problem at once (``trisocks check``): the
    config (``None`` if any problem) and one message per problem. The checks across keys run
    once every key is valid on its own."""
    merged = dict(file_values)
    merged.update({k: v for k, v in flag_values.items() if v is not None})
    problems, values = [], {}
    for key, raw in merged.items():
        try:
            values[key] = KEYS[key](key, raw)
        except ConfigError as exc:
            problems.append(str(exc))
    if values.get("admin_token_file") is not None:
        try:
            read_token_file(values["admin_token_file"])
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        return None, problems
    try:
        return build_config(file_values, flag_values), []
    except ConfigError as exc:
        return None, [str(exc)]


def read_token_file(path: Path, key: str = "admin_token_file") -> str:
    """The token in *path*: its one line, without surrounding whitespace.

    Raises:
        ConfigError: the file is missing, unreadable, empty, or holds more than one line.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{key}: file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{key}: cannot read {path}: {reason}") from None
    token = text.strip()
    if not token:
        raise ConfigError(f"{key}: file {path} is empty")
    if len(token.splitlines()) > 1:
        raise ConfigError(f"{key}: {path} has more than one line; the token alone goes in it")
    return token


def config_warnings(config: Config) -> list[str]:
    """What is allowed but unsafe in *config* (printed by ``serve`` and ``check``)."""
    warnings = []
    if config.admin_token_file is not None:
        try:
            mode = config.admin_token_file.stat().st_mode
        except OSError:  # read a moment ago; gone now: serve will say so
            mode = 0
        readers = " and ".join(who for bit, who in ((0o040, "group"), (0o004, "others"))
                               if mode & bit)
        if readers:
            warnings.append(f"admin_token_file: {config.admin_token_file} is readable by "
                            f"{readers} (mode {mode & 0o777:04o}); chmod 600 it")
    return warnings


def _check(config: Config) -> None:
    if "gssapi" in config.auth and importlib.util.find_spec("gssapi") is None:
        raise ConfigError(
            "auth: gssapi needs the optional extra: pip install 'trisocks[gssapi]' "
            "(and MIT Kerberos: libkrb5)"
        )
    if config.gss_keytab is not None and not config.gss_keytab.is_file():
        raise ConfigError(f"gss_keytab: file {config.gss_keytab} does not exist")
    missing = groups_used(config.rules) - {name for name, _ in config.groups}
    if missing:
        raise ConfigError(f"rules: group @{sorted(missing)[0]} is not defined in groups")
    _check_tls(config)
    if config.workers > 1 and any(e.port == 0 for e in (*config.listen, config.admin) if e):
        raise ConfigError("workers: port 0 would give every worker its own port; "
                          "give the listen and admin ports")
    if "none" in config.auth and not config.allow_open_proxy:
        exposed = [str(e) for e in config.listen if not e.is_loopback]
        if exposed:
            raise ConfigError(
                f"auth: 'none' on non-loopback listener {', '.join(exposed)} makes an open proxy; "
                "use password auth or pass --allow-open-proxy"
            )


def _check_tls(config: Config) -> None:
    tls = [str(e) for e in config.listen if e.tls]
    if tls and (config.tls_cert is None or config.tls_key is None):
        raise ConfigError(f"listen: TLS listener {tls[0]} needs tls_cert and tls_key")
    if (config.tls_cert is None) != (config.tls_key is None):
        raise ConfigError("tls_cert: give tls_cert and tls_key together")
    if config.tls_client_ca is not None and config.tls_cert is None:
        raise ConfigError("tls_client_ca: client certificates need tls_cert and tls_key")
    # The files themselves are loaded (and so checked) by trisocks.tls.server_context: by the
    # CLI before serving, by `trisocks check`, and on every reload.
