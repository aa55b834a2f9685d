"""Every config key and its converter (:data:`KEYS`), which turns a raw TOML or flag value
into the checked value of :class:`~trisocks.config.settings.Config`.

A converter is ``converter(key, raw_value) -> value`` and raises
:class:`~trisocks.config.values.ConfigError` naming *key*. The checks across keys are
:mod:`trisocks.config.build`'s.
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trisocks.config.values import ConfigError, Endpoint, IPNetwork
from trisocks.policy.matching import Rule
from trisocks.policy.rule_parsing import RuleError, parse_rules

__all__ = [
    "AUTH_METHODS", "GSS_LEVELS", "KEYS", "LOG_FORMATS", "LOG_LEVELS", "PROTOCOLS",
    "RELAY_ENGINES", "is_db_url",
]


AUTH_METHODS = ("none", "password", "gssapi")
GSS_LEVELS = (1, 2)
LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")
RELAY_ENGINES = ("auto", "splice", "copy")


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


def _ordered(what: str, choices: tuple[str, ...]) -> Any:
    """A converter of a comma list (or a TOML list) of some of *choices*, in order, no repeats;
    *what* names one of them in messages ("method", "backend")."""

    def convert(key: str, value: Any) -> tuple[str, ...]:
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, list | tuple) or not items:
            raise ConfigError(f"{key}: expected a list of {what}s")
        picked = tuple(str(item).strip() for item in items)
        for item in picked:
            if item not in choices:
                raise ConfigError(
                    f"{key}: unknown {what} {item!r} (known: {', '.join(choices)})"
                )
        if len(set(picked)) != len(picked):
            raise ConfigError(f"{key}: a {what} is listed twice")
        return picked

    return convert


PROTOCOLS = ("socks5", "socks4", "http")


PASSWORD_BACKENDS = ("store", "pam", "ldap", "http")


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


def _cores() -> int:
    """The cores this process may run on (its CPU affinity), what ``workers = "auto"`` is."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # no sched_getaffinity on this platform
        return os.cpu_count() or 1


def _workers(key: str, value: Any) -> int:
    """A count, or ``auto``: one worker per core, resolved now (``Config.workers`` is an int)."""
    if value == "auto":
        return _cores()
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f'{key}: expected a whole number >= 1 or "auto", got {value!r}')
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


def _resolvers(key: str, value: Any) -> tuple[Endpoint, ...]:
    """DNS servers: ``IP``, ``IP:PORT`` or ``[V6]:PORT`` (port 53 unless given), as a list or
    a comma list; an address, not a name (there is no resolver yet to look a name up)."""
    items = [v for v in value.split(",") if v.strip()] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not all(isinstance(i, str) for i in items):
        raise ConfigError(f"{key}: expected a list of IP or IP:PORT strings, got {value!r}")
    servers = []
    for item in (i.strip() for i in items):
        try:
            servers.append(Endpoint(str(ipaddress.ip_address(item)), 53))
            continue
        except ValueError:
            server = Endpoint.parse(item, key=key) if ":" in item else Endpoint(item, 53)
        try:
            ipaddress.ip_address(server.host)
        except ValueError:
            raise ConfigError(f"{key}: {item!r}: give the server's IP address") from None
        if server.port == 0:
            raise ConfigError(f"{key}: {item!r}: port 0 is no server's port")
        servers.append(server)
    return tuple(servers)


def _hosts(key: str, value: Any) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """A TOML table ``{"db.internal" = ["10.0.0.5"]}``, or ``NAME=IP,IP;NAME=IP``; names
    lower case without a trailing dot (IDNA-encoded), addresses as Python writes them."""
    if isinstance(value, str):
        pairs = [part.partition("=") for part in value.split(";") if part.strip()]
        if not all(sep for _, sep, _ in pairs):
            raise ConfigError(f"{key}: expected NAME=IP,IP;NAME=IP, got {value!r}")
        value = {name.strip(): [ip for ip in ips.split(",") if ip.strip()]
                 for name, _, ips in pairs}
    if not isinstance(value, Mapping) or not all(
        isinstance(ips, list) and ips and all(isinstance(ip, str) for ip in ips)
        for ips in value.values()
    ):
        raise ConfigError(f"{key}: expected a table of names to lists of addresses, got {value!r}")
    table: dict[str, tuple[str, ...]] = {}
    for name, ips in value.items():
        try:
            host = str(name).strip().rstrip(".").encode("idna").decode("ascii").lower()
            table[host] = tuple(str(ipaddress.ip_address(ip.strip())) for ip in ips)
        except (UnicodeError, ValueError) as exc:
            raise ConfigError(f"{key}: {name!r}: {exc}") from None
        if not host:
            raise ConfigError(f"{key}: an empty name")
    return tuple(sorted(table.items()))


KEYS: Mapping[str, Any] = {
    "listen": _listen,
    "auth": _ordered("method", AUTH_METHODS),
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
    "workers": _workers,
    "proxy_protocol": _bool,
    "tls_cert": _path,
    "tls_key": _path,
    "tls_client_ca": _path,
    "password_backends": _ordered("backend", PASSWORD_BACKENDS),
    "pam_service": _text,
    "ldap_url": _text,
    "ldap_starttls": _bool,
    "ldap_ca_file": _path,
    "ldap_user_dn": _text,
    "ldap_search_base": _text,
    "ldap_search_filter": _text,
    "ldap_bind_dn": _text,
    "ldap_bind_password_file": _path,
    "ldap_group_attribute": _text,
    "ldap_timeout": _positive,
    "ldap_pool_size": _count,
    "auth_hook_url": _text,
    "auth_hook_timeout": _positive,
    "auth_hook_token_file": _path,
    "auth_cache_ttl": _positive,
    "auth_revalidate_interval": _positive,
    "resolvers": _resolvers,
    "resolver_timeout": _positive,
    "resolver_cache_size": _limit,
    "hosts": _hosts,
    "via_timeout": _positive,
    "via_down_for": _positive,
}
"""Every config key with its converter: ``converter(key, raw_value) -> value``."""
