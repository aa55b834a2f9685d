"""What every session handler needs, built once per server."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from trisocks.accounting import Accountant
from trisocks.config import Config
from trisocks.identity.build import build_logins
from trisocks.identity.logins import Logins
from trisocks.identity.store import Authenticator
from trisocks.server.admission import Admission
from trisocks.server.egress import Egress
from trisocks.server.engines import Engine
from trisocks.server.hub import Hub
from trisocks.server.judge import Judge
from trisocks.server.reservations import Reservations
from trisocks.server.resolver import Resolver
from trisocks.server.stats import Stats
from trisocks.server.user_limits import UserLimiter
from trisocks.sessions import SessionRegistry

if TYPE_CHECKING:
    from trisocks.fleet.node import FleetNode
    from trisocks.store.interface import UserStore

__all__ = ["ServerContext", "Stats"]


@attrs.define(eq=False)
class ServerContext:
    config: Config
    store: UserStore
    registry: SessionRegistry
    authenticator: Authenticator
    accountant: Accountant
    engine: Engine
    stats: Stats = attrs.field(factory=Stats)
    hub: Hub | None = None
    """Carries the relays of plain-socket sessions while it runs (:mod:`trisocks.server.hub`);
    ``None`` or not running: every relay has its own pump tasks."""
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
    admission: Admission = attrs.field(init=False)
    """Connection rate, login backoff and handshake caps (:mod:`trisocks.server.admission`)."""
    judge: Judge = attrs.field(init=False)
    """The access rules (:mod:`trisocks.server.judge`)."""
    user_limits: UserLimiter = attrs.field(init=False)
    """Per-user sessions, quotas, rates and lifetime (:mod:`trisocks.server.user_limits`)."""
    reservations: Reservations = attrs.field(init=False)
    """BIND listeners and UDP associations held (:mod:`trisocks.server.reservations`)."""
    logins: Logins = attrs.field(init=False)
    """The password backends' chain (:mod:`trisocks.identity.logins`); a reload that changes
    their keys builds a new one (the old ones wait in ``retired_logins`` to be closed)."""
    retired_logins: list[Logins] = attrs.field(factory=list)
    resolver: Resolver = attrs.field(init=False)
    """DST.ADDR names to addresses (:mod:`trisocks.server.resolver`); a reload reconfigures it."""
    egress: Egress = attrs.field(init=False)
    """Source addresses of the rules' ``egress`` (:mod:`trisocks.server.egress`)."""

    def __attrs_post_init__(self) -> None:
        def config() -> Config:  # the parts read it through this: a reload replaces it
            return self.config

        self.admission = Admission(config, self.stats)
        self.judge = Judge(config, lambda: self.admin_address, self.stats, self.registry)
        self.user_limits = UserLimiter(config, self.store, self.accountant, self.stats,
                                       self.registry)
        self.reservations = Reservations(config, self.stats, self.registry)
        self.resolver = Resolver(self.config)
        self.egress = Egress(self.registry)
        self.logins = build_logins(self.config, self.authenticator)
