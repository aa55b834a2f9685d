"""The server's settings: one frozen :class:`Config`, every key with its default and meaning."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import attrs

from trisocks.config.keys import GSS_LEVELS
from trisocks.config.values import Endpoint, IPNetwork
from trisocks.policy.matching import Rule
from trisocks.policy.rule_parsing import DEFAULT_RULES, parse_rules

__all__ = ["Config", "default_db_path"]


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
    via_timeout: float = 5.0
    """A rule's ``via`` parent that is not reached, or not done negotiating, within this is
    skipped (and marked down for ``via_down_for``)."""
    via_down_for: float = 30.0
    """How long a parent that failed is skipped while another parent of the list is up."""
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
    admin: Endpoint | None = attrs.field(default=Endpoint("127.0.0.1", 8080))
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
    password_backends: tuple[str, ...] = ("store",)
    """Where RFC 1929 and HTTP Basic logins are checked, in order (:mod:`trisocks.identity`)."""
    pam_service: str = "trisocks"
    """The PAM service (``/etc/pam.d/<service>``) of the ``pam`` backend."""
    ldap_url: str | None = None
    """``ldap://host:port`` or ``ldaps://host:port`` of the ``ldap`` backend."""
    ldap_starttls: bool = False
    """Upgrade an ``ldap://`` connection with StartTLS before binding."""
    ldap_ca_file: Path | None = None
    """PEM CA bundle that verifies the directory's certificate (ldaps, StartTLS)."""
    ldap_user_dn: str | None = None
    """Direct bind: the user's DN, ``{user}`` standing for the name (escaped, RFC 4514)."""
    ldap_search_base: str | None = None
    """Search-then-bind: where the user is searched (with ``ldap_search_filter``)."""
    ldap_search_filter: str = "(uid={user})"
    """Search-then-bind: ``{user}`` stands for the name (escaped, RFC 4515)."""
    ldap_bind_dn: str | None = None
    """Search-then-bind: the DN the search binds as (anonymous when unset)."""
    ldap_bind_password_file: Path | None = None
    """The file holding ``ldap_bind_dn``'s password, one line."""
    ldap_group_attribute: str = "memberOf"
    """The user entry's attribute naming its groups (DNs: the first RDN's value is the group)."""
    ldap_timeout: float = 5.0
    """Seconds a directory operation may take; beyond it, a backend error (fail closed)."""
    ldap_pool_size: int = 4
    """Directory connections (and threads) at once."""
    auth_hook_url: str | None = None
    """The ``http`` backend: logins are POSTed here as JSON."""
    auth_hook_timeout: float = 5.0
    """Seconds the hook may take to answer; beyond it, a backend error (fail closed)."""
    auth_hook_token_file: Path | None = None
    """A bearer token sent to the hook (``Authorization: Bearer``), one line."""
    auth_cache_ttl: float = 60.0
    """Seconds a successful external login is answered from memory (a keyed digest)."""
    auth_revalidate_interval: float = 300.0
    """Seconds between fresh checks of external identities with live sessions."""
    resolvers: tuple[Endpoint, ...] = ()
    """DNS servers DST.ADDR names are looked up at, in order (:mod:`trisocks.server.resolver`:
    A and AAAA over UDP, TCP for truncated answers, TTLs kept); none: the system resolver."""
    resolver_timeout: float = 5.0
    """Seconds a lookup at ``resolvers`` may take; then it fails (REP 04), and is not kept."""
    resolver_cache_size: int | None = 10000
    """Names whose answers (and negative answers) from ``resolvers`` are kept; ``None``: none."""
    hosts: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """Static names, answered before any resolver (the system's too): (name, addresses)."""
