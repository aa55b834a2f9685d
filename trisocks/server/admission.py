"""Admission: who may open a connection, and handshakes in flight.

1. At accept (:meth:`Admission.admit`): new connections per client IP, and IPs backing off
   after failed logins. A refused connection is closed before a byte is read; it never enters
   the session registry (a flood must not flood the access log either).
2. Handshakes in flight (:meth:`Admission.handshaking`) are capped per client group (an IPv4
   address, an IPv6 /64) and server-wide, but a newcomer is never refused for them: the
   oldest unfinished handshake over the cap is evicted instead, so idle half-open
   connections cannot lock anyone out, not even others behind the flooding address (NAT).
   Over half the cap, new handshakes also get less time (:func:`pressure_timeout`).

Refusals and evictions are counted in ``stats.limited`` under the limit's name.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import attrs
import trio

from trisocks.policy.limits import AuthBackoff, InFlight, KeyedRate, client_group
from trisocks.policy.rules import IP
from trisocks.sessions import Session

if TYPE_CHECKING:
    from trisocks.config import Config
    from trisocks.server.stats import Stats

__all__ = ["Admission", "HandshakeEvicted", "pressure_timeout"]

log = logging.getLogger("trisocks.policy")


class HandshakeEvicted(Exception):
    """The handshake was ended to make room for a newer connection; ``limit`` names the cap."""

    def __init__(self, limit: str) -> None:
        super().__init__(f"evicted: {limit}")
        self.limit = limit


def pressure_timeout(timeout: float, load: float) -> float:
    """The handshake timeout for a connection admitted at *load* (the fuller of its client
    group's and the server's handshake caps, 0..1): the whole *timeout* up to half full, then
    linearly less, down to half of it at full (a stalled flood then holds slots half as long,
    while a prompt client still has ample time)."""
    return timeout * min(1.0, max(0.5, 1.5 - load))


@attrs.define(eq=False)
class _Handshake:
    """A handshake in flight: its session and the scope that ends it (timeout or eviction)."""

    session: Session
    scope: trio.CancelScope
    group: object
    """Its client group (:func:`client_group`)."""
    evicted: str | None = None
    """The cap it was evicted for."""


class _Handshaking:
    """:meth:`Admission.handshaking`: a plain class, not a generator, for it runs once per
    connection."""

    __slots__ = ("_admission", "_config", "_entry", "_token")

    def __init__(self, admission: Admission, session: Session, ip: IP) -> None:
        self._admission = admission
        self._config = admission._config()
        self._entry = _Handshake(session, trio.CancelScope(), client_group(ip))

    def __enter__(self) -> None:
        admission, config, entry = self._admission, self._config, self._entry
        handshakes = admission._handshakes
        admission._enter(entry)
        load = len(handshakes) / config.max_handshakes
        if config.max_handshakes_per_client:
            load = max(load, handshakes.count(entry.group) / config.max_handshakes_per_client)
        entry.scope.deadline = trio.current_time() + pressure_timeout(
            config.handshake_timeout, load
        )
        self._token = _CURRENT.set(entry)
        entry.scope.__enter__()

    def __exit__(self, *exc_info: Any) -> None:
        admission, config, entry = self._admission, self._config, self._entry
        try:
            entry.scope.__exit__(*exc_info)  # it swallows only its own cancel: raised below
        finally:
            _CURRENT.reset(self._token)
            admission._handshakes.remove(entry)
            if admission._crowded:  # an episode ends under half the cap
                group = entry.group
                if (admission._handshakes.count(group) * 2
                        < (config.max_handshakes_per_client or 1)):
                    admission._crowded.discard(group)
                if len(admission._handshakes) * 2 < config.max_handshakes:
                    admission._crowded.discard(None)
        if entry.scope.cancelled_caught:
            if entry.evicted is not None:
                raise HandshakeEvicted(entry.evicted)
            raise trio.TooSlowError


class _ServerWork:
    """:meth:`Admission.server_work`."""

    __slots__ = ("_admission", "_entry")

    def __init__(self, admission: Admission) -> None:
        self._admission = admission
        self._entry: _Handshake | None = None

    def __enter__(self) -> None:
        entry = _CURRENT.get()
        if entry is not None and self._admission._handshakes.remove(entry):
            self._entry = entry

    def __exit__(self, *exc_info: object) -> None:
        entry = self._entry
        if entry is not None and not entry.scope.cancel_called:
            self._admission._enter(entry)


_CURRENT: contextvars.ContextVar[_Handshake | None] = contextvars.ContextVar(
    "trisocks_handshake", default=None
)
"""The handshake the current task is in (:meth:`Admission.handshaking`)."""


class Admission:
    """Connection rate and login backoff at accept; the handshake caps, with eviction.

    *config* gives the running config (a reload replaces it; :meth:`configure` then takes
    its connection rate and backoff limits); refusals are counted in *stats*.
    """

    def __init__(self, config: Callable[[], Config], stats: Stats) -> None:
        self._config = config
        self._stats = stats
        self._handshakes: InFlight[_Handshake] = InFlight()
        self._crowded: set[object] = set()
        """Client groups (and ``None``: the server) whose handshake cap was hit; logged once
        per episode, which ends when the group has no handshake left."""
        self._auth = AuthBackoff(1)
        self._connections: KeyedRate | None = None
        self.configure(config())

    def configure(self, config: Config) -> None:
        """Take the limits of *config* (at start and on reload); counters and backoff state
        carry over."""
        self._auth.threshold = config.auth_failure_limit or 0
        self._auth.cap = config.auth_backoff_max
        rate = config.connection_rate
        if rate is None:
            self._connections = None
        elif self._connections is None or self._connections.rate != rate:
            self._connections = KeyedRate(rate, max(1.0, 2 * rate))

    def admit(self, ip: IP) -> str | None:
        """The limit a new connection from *ip* is over, or ``None`` to go on."""
        now = trio.current_time()
        if self._connections is not None and not self._connections.allow(ip, now):
            reason = "connection_rate"
        elif self._auth.threshold and self._auth.blocked(ip, now) and not self._exempt(ip):
            reason = "auth_backoff"
        else:
            return None
        self._stats.limited[reason] += 1
        return reason

    @property
    def handshakes(self) -> int:
        """Handshakes in flight."""
        return len(self._handshakes)

    def handshakes_from(self, ip: IP) -> int:
        """Handshakes in flight from *ip*'s client group."""
        return self._handshakes.count(client_group(ip))

    def handshaking(self, session: Session, ip: IP) -> _Handshaking:
        """``with admission.handshaking(session, ip):`` runs *session*'s handshake in a slot
        of its client group's and the server's caps.

        Over a cap, the oldest handshakes still in flight are evicted to make room (counted in
        ``stats.limited`` under the cap's name). The handshake must finish within
        :func:`pressure_timeout` of ``handshake_timeout``.

        Raises:
            trio.TooSlowError: the handshake timed out.
            HandshakeEvicted: a newer connection took its slot.
        """
        return _Handshaking(self, session, ip)

    def progress(self) -> None:
        """The current handshake got a whole message: it is not stalled, so it moves behind
        every handshake that has made no progress since (evicted after them)."""
        entry = _CURRENT.get()
        if entry is not None:
            self._handshakes.touch(entry)

    def server_work(self) -> _ServerWork:
        """``with admission.server_work():`` the current handshake waits on us (a password
        check), not on its client: it is not stalled, so it holds no slot and cannot be
        evicted meanwhile; it comes back as the newest (it made progress)."""
        return _ServerWork(self)

    def _enter(self, entry: _Handshake) -> None:
        """Put *entry* in its slots, evicting the oldest stalled handshakes over a cap."""
        config = self._config()
        group = entry.group
        evicted = self._handshakes.add(
            entry, group, key_cap=config.max_handshakes_per_client, cap=config.max_handshakes
        )
        for old, cap in evicted:
            limit = "max_handshakes_per_client" if cap == "key" else "max_handshakes"
            crowd = group if cap == "key" else None
            if crowd not in self._crowded:
                self._crowded.add(crowd)
                log.warning("%s: %s reached; evicting the oldest unfinished handshakes",
                            "server" if crowd is None else f"client {crowd}", limit)
            self._stats.limited[limit] += 1
            old.evicted = limit
            old.scope.cancel()

    def _exempt(self, ip: IP) -> bool:
        return any(ip in network for network in self._config().auth_backoff_exempt)

    def auth_result(self, ip: IP, ok: bool) -> None:
        if ok:
            self._auth.succeeded(ip)
        elif self._exempt(ip):
            return
        elif self._auth.threshold and self._auth.failed(ip, trio.current_time()):
            log.info("%s: %d+ failed logins; backing off", ip, self._auth.threshold)
