"""What every session handler needs, built once per server."""

from __future__ import annotations

import collections
import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from trisocks.accounting import Accountant
from trisocks.auth import Authenticator
from trisocks.config import Config
from trisocks.server.guard import Guard
from trisocks.server.relay import Engine
from trisocks.sessions import SessionRegistry

if TYPE_CHECKING:
    from trisocks.fleet.node import FleetNode
    from trisocks.store.interface import UserStore

__all__ = ["ServerContext", "Stats"]


@attrs.define
class Stats:
    """Server-wide counters (exported by ``/metrics``)."""

    started_at: float = attrs.field(factory=trio.current_time)
    handshake_failures: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """By reason: timeout, evicted, bad_version, no_acceptable_method, auth_failed, malformed,
    eof, unknown_protocol (the first byte starts no enabled protocol), auth_required (SOCKS4
    where a password is required), tls (a TLS listener's handshake failed, or the client
    spoke no TLS)."""
    protocols: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """Ended sessions by protocol: socks5, socks4, http-connect, http."""
    replies: collections.Counter[int] = attrs.field(factory=collections.Counter)
    """Final REP codes sent."""
    udp_dropped: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """UDP datagrams dropped, by reason: foreign_source, malformed, fragment, not_allowed,
    unreachable (the target did not resolve or the send failed)."""
    reassembled: int = 0
    """UDP fragment sequences reassembled."""
    bytes_up: int = 0
    """Payload bytes of ended sessions (live sessions are added by whoever reads)."""
    bytes_down: int = 0
    rejected_over_limit: int = 0
    """Connections closed at accept because max_sessions was reached."""
    limited: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """Connections or requests refused by a limit: connection_rate, auth_backoff (closed at
    accept), max_handshakes, max_handshakes_per_client (the oldest unfinished handshake
    evicted), user_sessions, quota, user_binds, user_udp (REP 02 or session ended),
    udp_sockets (REP 01)."""
    denied: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """Requests and UDP datagrams denied, by rule id."""
    reloads: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """Config reloads by outcome: ok, failed."""


@attrs.define(eq=False)
class ServerContext:
    config: Config
    store: UserStore
    registry: SessionRegistry
    authenticator: Authenticator
    accountant: Accountant
    engine: Engine
    stats: Stats = attrs.field(factory=Stats)
    access_log: logging.Logger = attrs.field(factory=lambda: logging.getLogger("trisocks.access"))
    shutdown: trio.Event = attrs.field(factory=trio.Event)
    """Set to stop accepting and drain."""
    listening: list[tuple[str, int]] = attrs.field(factory=list)
    """The SOCKS listeners' real addresses, once bound."""
    admin_address: tuple[str, int] | None = None
    """The admin API's real address once it listens; ``None`` while off."""
    load_config: Callable[[], Config] | None = None
    """Re-reads the config file and flags (set by the CLI); ``None``: nothing to reload."""
    fleet: FleetNode | None = None
    """This instance's part in a fleet (:mod:`trisocks.fleet.node`); ``None`` when alone."""
    tls_context: ssl.SSLContext | None = None
    """What new TLS handshakes use (:mod:`trisocks.tls`); replaced on reload, while live
    sessions keep the one they started with."""
    guard: Guard = attrs.field(init=False)
    """Access rules, limits and quotas (:mod:`trisocks.server.guard`)."""

    def __attrs_post_init__(self) -> None:
        self.guard = Guard(self)
