"""The options of ``trisocks serve`` and ``trisocks check``: ``--config FILE`` and one flag for
every config key, turned into a :class:`~trisocks.config.Config` the way ``serve`` runs it."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from trisocks.cli.common import fail
from trisocks.config import (
    KEYS,
    Config,
    ConfigError,
    build_config,
    config_warnings,
    default_db_path,
    load_file,
)

__all__ = ["SERVE_HELP", "add_config_flags", "flag_values", "load_config", "read_config",
           "serve_warnings"]

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
    "workers": ("N|auto", "processes sharing the listeners with SO_REUSEPORT, restarted if "
                "they crash; the admin API runs in the first; 'auto' for one per core this "
                "process may run on (its CPU affinity) (default 1)"),
    "proxy_protocol": ("", "listeners expect a PROXY protocol v1/v2 header (HAProxy "
                       "send-proxy/send-proxy-v2) and refuse connections without one"),
    "tls_cert": ("FILE", "PEM certificate chain of tls:// listeners; re-read on reload"),
    "tls_key": ("FILE", "PEM private key of tls:// listeners; re-read on reload"),
    "tls_client_ca": ("FILE", "PEM CA bundle: TLS clients must present a certificate it "
                      "verifies, and its subject CN is the user, no password (default off)"),
    "password_backends": ("LIST", "comma list of where password logins are checked, first "
                          "answer wins: store, pam, ldap, http (default store)"),
    "pam_service": ("NAME", "PAM service of the pam backend (default trisocks)"),
    "ldap_url": ("URL", "ldap://HOST[:PORT] or ldaps://... of the ldap backend"),
    "ldap_starttls": ("", "upgrade ldap:// with StartTLS before binding"),
    "ldap_ca_file": ("FILE", "PEM CA bundle verifying the directory's certificate"),
    "ldap_user_dn": ("TEMPLATE", "direct bind: the user's DN, {user} for the name, e.g. "
                     "uid={user},ou=people,dc=example,dc=org"),
    "ldap_search_base": ("DN", "search-then-bind: where users are searched"),
    "ldap_search_filter": ("FILTER", "search-then-bind: {user} for the name "
                           "(default (uid={user}))"),
    "ldap_bind_dn": ("DN", "search-then-bind: the DN the search binds as (default anonymous)"),
    "ldap_bind_password_file": ("FILE", "file holding ldap_bind_dn's password, one line"),
    "ldap_group_attribute": ("ATTR", "the user's group attribute; a group DN's first RDN "
                             "value is @group in rules (default memberOf)"),
    "ldap_timeout": ("SECONDS", "a directory operation longer than this fails closed "
                     "(default 5)"),
    "ldap_pool_size": ("N", "directory connections at once (default 4)"),
    "auth_hook_url": ("URL", "http backend: logins are POSTed here as JSON"),
    "auth_hook_timeout": ("SECONDS", "the hook must answer within this, else fail closed "
                          "(default 5)"),
    "auth_hook_token_file": ("FILE", "bearer token sent to the hook, one line"),
    "auth_cache_ttl": ("SECONDS", "successful external logins answered from memory this long "
                       "(default 60)"),
    "auth_revalidate_interval": ("SECONDS", "fresh check of external identities with live "
                                 "sessions this often (default 300)"),
    "resolvers": ("SERVERS", "comma list of DNS servers for DST.ADDR names, IP or IP:PORT "
                  "([v6]:PORT), asked in order over UDP (TCP for truncated answers), answers "
                  "kept for their TTL (default: the system resolver)"),
    "resolver_timeout": ("SECONDS", "a lookup at resolvers longer than this fails with "
                         "REP 04 (default 5)"),
    "resolver_cache_size": ("N", "names whose answers from resolvers are kept, negative ones "
                            "too; 'off' for none (default 10000)"),
    "hosts": ("HOSTS", "static names answered before any resolver, as NAME=IP,IP;NAME=IP "
              "(in the file: a [hosts] table)"),
    "via_timeout": ("SECONDS", "a via parent not reached and negotiated within this is skipped "
                    "and marked down (default 5)"),
    "via_down_for": ("SECONDS", "a via parent that failed is skipped this long while another "
                     "is up (default 30)"),
}
assert SERVE_HELP.keys() == KEYS.keys(), "every config key needs a flag"


def add_config_flags(p: argparse.ArgumentParser) -> None:
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
            "udp_sockets", "ldap_pool_size", "resolver_cache_size"}
_NUMERIC = _INTEGER | {"via_down_for"} | {
    key for key in KEYS
    if key.endswith(("_timeout", "_grace", "_interval", "_rate", "_max", "_duration", "_ttl"))
}
_WORDY = {"workers"}
"""Numeric flags that also take a word ("auto"): what is not a number is left to the key's
converter, which knows the word and names what it expects."""


def flag_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config keys as the flags give them (``None`` where not given), numbers parsed; a
    flag that is not a number exits 2 (but one of :data:`_WORDY`)."""
    values: dict[str, Any] = {}
    for key in KEYS:
        value = getattr(args, key, None)
        if value is not None and key in _NUMERIC and value != "off":
            try:
                value = int(value) if key in _INTEGER else float(value)
            except ValueError:
                if key not in _WORDY:
                    fail(f"--{key.replace('_', '-')}: {value!r} is not a number")
        values[key] = value
    return values


def read_config(args: argparse.Namespace) -> Config:
    """The config from the file (read now) and the flags.

    Raises:
        ConfigError: naming the key at fault.
    """
    file_values = load_file(args.config) if args.config else {}
    return build_config(file_values, flag_values(args))


def load_config(args: argparse.Namespace) -> Config:
    """:func:`read_config`, with a bad config exiting 2 on one line."""
    try:
        return read_config(args)
    except ConfigError as exc:
        fail(str(exc))


def serve_warnings(args: argparse.Namespace, config: Config) -> list[str]:
    """What ``serve`` and ``check`` warn about: the config's warnings, and a token given on
    the command line."""
    warnings = config_warnings(config)
    if getattr(args, "admin_token", None) is not None:
        warnings.append("--admin-token: a token on the command line is visible to every local "
                        "user in the process list; use admin_token_file or $TRISOCKS_ADMIN_TOKEN")
    return warnings
