"""A :class:`~trisocks.config.settings.Config` from a TOML file and flags, and its checks:
:func:`build_config` (the first problem), :func:`config_problems` (every one, for ``trisocks
check``), :func:`config_warnings` (allowed but unsafe)."""

from __future__ import annotations

import importlib.util
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from trisocks.config.keys import KEYS
from trisocks.config.settings import Config
from trisocks.config.values import ConfigError
from trisocks.policy.rule_parsing import groups_used

__all__ = [
    "build_config", "config_problems", "config_warnings", "load_file", "read_token_file",
]


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
    # An external backend (pam, ldap, http) may give groups no config table lists.
    if missing and set(config.password_backends) <= {"store"}:
        raise ConfigError(f"rules: group @{sorted(missing)[0]} is not defined in groups")
    _check_tls(config)
    _check_identity(config)
    _check_routes(config)
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


def _check_identity(config: Config) -> None:
    backends = config.password_backends
    if "ldap" in backends:
        url = config.ldap_url
        if url is None:
            raise ConfigError("password_backends: ldap needs ldap_url")
        if not url.lower().startswith(("ldap://", "ldaps://")):
            raise ConfigError(f"ldap_url: expected ldap://HOST[:PORT] or ldaps://..., got {url!r}")
        if (config.ldap_user_dn is None) == (config.ldap_search_base is None):
            raise ConfigError("ldap_user_dn: give either ldap_user_dn (direct bind) or "
                              "ldap_search_base (search, then bind), not both or neither")
        if config.ldap_user_dn is not None and "{user}" not in config.ldap_user_dn:
            raise ConfigError("ldap_user_dn: the template must contain {user}")
        if config.ldap_search_base is not None and "{user}" not in config.ldap_search_filter:
            raise ConfigError("ldap_search_filter: the filter must contain {user}")
        if (config.ldap_bind_dn is None) != (config.ldap_bind_password_file is None):
            raise ConfigError("ldap_bind_dn: give ldap_bind_dn and ldap_bind_password_file "
                              "together")
        if config.ldap_starttls and url.lower().startswith("ldaps://"):
            raise ConfigError("ldap_starttls: ldaps:// is TLS already")
        for key in ("ldap_ca_file", "ldap_bind_password_file"):
            path = getattr(config, key)
            if path is not None and not path.is_file():
                raise ConfigError(f"{key}: file {path} does not exist")
    if "http" in backends:
        url = config.auth_hook_url
        if url is None:
            raise ConfigError("password_backends: http needs auth_hook_url")
        if not url.lower().startswith(("http://", "https://")):
            raise ConfigError(f"auth_hook_url: expected http:// or https://..., got {url!r}")
        path = config.auth_hook_token_file
        if path is not None and not path.is_file():
            raise ConfigError(f"auth_hook_token_file: file {path} does not exist")
    if "pam" in backends and importlib.util.find_spec("pam") is None:
        raise ConfigError("password_backends: pam needs the python-pam package "
                          "(pip install python-pam)")


def _check_routes(config: Config) -> None:
    for rule in config.rules:
        if rule.route is None or not rule.route.via:
            continue
        # BIND and UDP ASSOCIATE go through SOCKS5 parents only (trisocks.server.parents):
        # a rule whose parents are all HTTP would refuse them all; say so now.
        if all(parent.scheme == "http" for parent in rule.route.via):
            left = {"bind", "udp"} if rule.commands is None else rule.commands & {"bind", "udp"}
            if left:
                raise ConfigError(
                    f"rules: rule {rule.id!r}: via has only http parents, which cannot carry "
                    f"{' or '.join(sorted(left))}; add a socks5 parent or give it "
                    f"commands = [\"connect\"]")
