"""The policy applied to one server: admission, limits, rules, quotas, rates and reload.

Where each check sits, cheapest first:

1. At accept (:meth:`Guard.admit`): new connections per client IP, and IPs backing off after
   failed logins. A refused connection is closed before a byte is read; it never enters the
   session registry (a flood must not flood the access log either).
   Handshakes in flight (:meth:`Guard.handshaking`) are capped per client group (an IPv4
   address, an IPv6 /64) and server-wide, but a newcomer is never refused for them: the
   oldest unfinished handshake over the cap is evicted instead, so idle half-open
   connections cannot lock anyone out, not even others behind the flooding address (NAT).
   Over half the cap, new handshakes also get less time (:func:`pressure_timeout`).
   BIND listeners and UDP associations held at once are capped per user (:meth:`Guard.reserve`;
   unauthenticated sessions count per client group), UDP sockets server-wide.
2. After the request (:meth:`Guard.open_request`): the user's session limit and quota, then the
   rules on what the client asked. CONNECT to a name is judged again per resolved address by
   :mod:`trisocks.server.dial`, which connects only to addresses it judged.
3. While relaying: per-user token buckets (:meth:`Guard.throttles`), and :meth:`Guard.run`,
   which ends sessions over quota. Both read limits from the store, so changes made by
   ``trisocks user limits`` or the admin API apply without a restart.

Refusals are counted in ``stats.limited`` (by limit) and ``stats.denied`` (by rule id).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import attrs
import trio

from trisocks.logs import quote
from trisocks.net import ip_of
from trisocks.policy.addresses import Network, host_networks
from trisocks.policy.limits import (
    AuthBackoff,
    Counts,
    InFlight,
    KeyedRate,
    TokenBucket,
    client_group,
)
from trisocks.policy.quotas import UserLimits, quota_exceeded
from trisocks.policy.rules import IP, Decision, Query, RuleSet
from trisocks.protocol import AddressType, Command, Reply, Request
from trisocks.server.dial import literal
from trisocks.sessions import Session
from trisocks.throttle import Throttle

if TYPE_CHECKING:
    from trisocks.config import Config
    from trisocks.server.context import ServerContext

__all__ = ["Guard", "HandshakeEvicted", "Throttle", "pressure_timeout"]

log = logging.getLogger("trisocks.policy")

WATCH_INTERVAL = 0.5
"""Seconds between quota checks of live sessions."""
BURST_SECONDS = 0.25
"""A user's byte bucket holds this many seconds of its rate."""
UDP_DECISIONS = 256
"""Per-association cache of datagram decisions (the rules are pure, so caching is exact)."""


@attrs.define(eq=False)
class _UserRate:
    """A user's byte buckets, shared by all of its sessions."""

    up: TokenBucket | None
    down: TokenBucket | None
    sessions: int = 0

    def matches(self, limits: UserLimits) -> bool:
        return (self.up and self.up.rate) == limits.rate_up and (
            self.down and self.down.rate
        ) == limits.rate_down


def _bucket(rate: int | None) -> TokenBucket | None:
    return None if rate is None else TokenBucket(rate, max(1.0, rate * BURST_SECONDS))


_RULE_COMMANDS = {Command.CONNECT: "connect", Command.BIND: "bind", Command.UDP_ASSOCIATE: "udp",
                  Command.RESOLVE: "resolve", Command.RESOLVE_PTR: "resolve"}


def command_of(request: Request) -> str:
    """The request's command as the rules name it."""
    return _RULE_COMMANDS[request.command]


UDP_SOCKETS_PER_ASSOCIATION = 2
"""What a UDP association takes of ``udp_sockets``: the socket facing the client and its one
dual-stack outbound socket (reserved up front, so the outbound one never fails for want of
budget halfway through an association)."""


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


_CURRENT: contextvars.ContextVar[_Handshake | None] = contextvars.ContextVar(
    "trisocks_handshake", default=None
)
"""The handshake the current task is in (:meth:`Guard.handshaking`)."""


class Guard:
    def __init__(self, ctx: ServerContext) -> None:
        self._ctx = ctx
        self._handshakes: InFlight[_Handshake] = InFlight()
        self._crowded: set[object] = set()
        """Client groups (and ``None``: the server) whose handshake cap was hit; logged once
        per episode, which ends when the group has no handshake left."""
        self.binds = Counts()
        self.udp = Counts()
        """BIND listeners and UDP associations held, by :meth:`owner`."""
        self.udp_sockets = 0
        """UDP sockets reserved by live associations."""
        self._held: dict[Session, tuple[str, object]] = {}
        self.user_sessions = Counts()
        self._auth = AuthBackoff(1)
        self._connections: KeyedRate | None = None
        self._rates: dict[str, _UserRate] = {}
        self._queries: dict[Session, Query] = {}
        self._ruleset_key: tuple[object, ...] = ()
        self._ruleset: RuleSet | None = None
        self.local: frozenset[Network] = frozenset()
        """This host's addresses (``@local``): read at start and on reload."""
        self.read_local_addresses()
        self.configure(ctx.config)
        ctx.registry.add_listener(self._on_event)
        ctx.registry.add_listener(self._release_on_end)

    # --- configuration ---------------------------------------------------------------------

    def configure(self, config: Config) -> None:
        """Take the limits of *config*; counters and backoff state carry over."""
        self._auth.threshold = config.auth_failure_limit or 0
        self._auth.cap = config.auth_backoff_max
        rate = config.connection_rate
        if rate is None:
            self._connections = None
        elif self._connections is None or self._connections.rate != rate:
            self._connections = KeyedRate(rate, max(1.0, 2 * rate))

    def read_local_addresses(self) -> None:
        """Read this host's interface addresses again (``@local``, and ``@admin`` on a
        wildcard): at start, and on reload (:func:`trisocks.server.reload.reload_config`)."""
        self.local = host_networks()

    @property
    def ruleset(self) -> RuleSet:
        """The rules of the current config, bound to where the admin API really listens and
        to this host's addresses."""
        config = self._ctx.config
        key = (config.rules, config.rules_default, config.groups, self._ctx.admin_address,
               self.local)
        if self._ruleset is None or key != self._ruleset_key:
            self._ruleset_key = key
            self._ruleset = RuleSet(
                config.rules,
                default_allow=config.rules_default == "allow",
                groups=dict(config.groups),
                admin=self._ctx.admin_address,
                local=sorted(self.local, key=lambda n: (n.version, n)),
            )
        return self._ruleset

    # --- 1. at accept ------------------------------------------------------------------------

    def admit(self, ip: IP) -> str | None:
        """The limit a new connection from *ip* is over, or ``None`` to go on."""
        now = trio.current_time()
        if self._connections is not None and not self._connections.allow(ip, now):
            reason = "connection_rate"
        elif self._auth.threshold and self._auth.blocked(ip, now) and not self._exempt(ip):
            reason = "auth_backoff"
        else:
            return None
        self._ctx.stats.limited[reason] += 1
        return reason

    @property
    def handshakes(self) -> int:
        """Handshakes in flight."""
        return len(self._handshakes)

    def handshakes_from(self, ip: IP) -> int:
        """Handshakes in flight from *ip*'s client group."""
        return self._handshakes.count(client_group(ip))

    @contextlib.contextmanager
    def handshaking(self, session: Session, ip: IP) -> Iterator[None]:
        """Run *session*'s handshake in a slot of its client group's and the server's caps.

        Over a cap, the oldest handshakes still in flight are evicted to make room (counted in
        ``stats.limited`` under the cap's name). The handshake must finish within
        :func:`pressure_timeout` of ``handshake_timeout``.

        Raises:
            trio.TooSlowError: the handshake timed out.
            HandshakeEvicted: a newer connection took its slot.
        """
        config = self._ctx.config
        group = client_group(ip)
        entry = _Handshake(session, trio.CancelScope(), group)
        self._enter(entry)
        load = len(self._handshakes) / config.max_handshakes
        if config.max_handshakes_per_client:
            load = max(load, self._handshakes.count(group) / config.max_handshakes_per_client)
        entry.scope.deadline = trio.current_time() + pressure_timeout(
            config.handshake_timeout, load
        )
        token = _CURRENT.set(entry)
        try:
            with entry.scope:
                yield
        finally:
            _CURRENT.reset(token)
            self._handshakes.remove(entry)
            if self._crowded:  # an episode ends under half the cap
                if self._handshakes.count(group) * 2 < (config.max_handshakes_per_client or 1):
                    self._crowded.discard(group)
                if len(self._handshakes) * 2 < config.max_handshakes:
                    self._crowded.discard(None)
        if entry.scope.cancelled_caught:
            if entry.evicted is not None:
                raise HandshakeEvicted(entry.evicted)
            raise trio.TooSlowError

    def progress(self) -> None:
        """The current handshake got a whole message: it is not stalled, so it moves behind
        every handshake that has made no progress since (evicted after them)."""
        entry = _CURRENT.get()
        if entry is not None:
            self._handshakes.touch(entry)

    @contextlib.contextmanager
    def server_work(self) -> Iterator[None]:
        """The current handshake waits on us (a password check), not on its client: it is not
        stalled, so it holds no slot and cannot be evicted meanwhile; it comes back as the
        newest (it made progress)."""
        entry = _CURRENT.get()
        if entry is None or not self._handshakes.remove(entry):
            yield
            return
        try:
            yield
        finally:
            if not entry.scope.cancel_called:
                self._enter(entry)

    def _enter(self, entry: _Handshake) -> None:
        """Put *entry* in its slots, evicting the oldest stalled handshakes over a cap."""
        config = self._ctx.config
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
            self._ctx.stats.limited[limit] += 1
            old.evicted = limit
            old.scope.cancel()

    def _exempt(self, ip: IP) -> bool:
        return any(ip in network for network in self._ctx.config.auth_backoff_exempt)

    def auth_result(self, ip: IP, ok: bool) -> None:
        if ok:
            self._auth.succeeded(ip)
        elif self._exempt(ip):
            return
        elif self._auth.threshold and self._auth.failed(ip, trio.current_time()):
            log.info("%s: %d+ failed logins; backing off", ip, self._auth.threshold)

    # --- what a session holds beyond its connection ------------------------------------------

    @staticmethod
    def owner(session: Session) -> tuple[str, object]:
        """Whom per-user caps count *session* under: its user, or, unauthenticated, its client
        group (one anonymous key would let one client lock out every other one)."""
        if session.user is not None:
            return ("user", session.user)
        return ("client", client_group(ip_of(session.client.rpartition(":")[0].strip("[]"))))

    def reserve(self, session: Session, kind: str) -> Reply | None:
        """Hold a BIND listener (*kind* ``"bind"``) or a UDP association (``"udp"``) for
        *session* until :meth:`release` or the session's end.

        Returns:
            ``None`` when held. Otherwise the REP to refuse with, the refusal counted in
            ``stats.limited``, logged and made the close reason: REP 02 (not allowed) for the
            owner's own cap (``max_binds_per_user``, ``max_udp_per_user``), REP 01 (general
            failure) when the server's ``udp_sockets`` budget is used up.
        """
        config = self._ctx.config
        owner = self.owner(session)
        counts, cap, limit, what = (
            (self.binds, config.max_binds_per_user, "user_binds", "BIND listeners")
            if kind == "bind"
            else (self.udp, config.max_udp_per_user, "user_udp", "UDP associations")
        )
        name = quote(session.user) if session.user is not None else f"client {owner[1]}"
        if cap is not None and counts[owner] >= cap:
            reply, why = Reply.NOT_ALLOWED, f"{name} holds {cap} {what} already"
        elif kind == "udp" and self.udp_sockets + UDP_SOCKETS_PER_ASSOCIATION > config.udp_sockets:
            limit, reply = "udp_sockets", Reply.GENERAL_FAILURE
            why = f"the server's {config.udp_sockets} UDP sockets are all in use"
        else:
            counts.acquire(owner, None)
            if kind == "udp":
                self.udp_sockets += UDP_SOCKETS_PER_ASSOCIATION
            self._held[session] = (kind, owner)
            return None
        self._ctx.stats.limited[limit] += 1
        log.info("session %s: %s refused: %s", session.id, kind.upper(), why)
        session.close_reason = why
        return reply

    def release(self, session: Session) -> None:
        """Give back what :meth:`reserve` holds for *session* (nothing if it holds nothing)."""
        held = self._held.pop(session, None)
        if held is None:
            return
        kind, owner = held
        if kind == "bind":
            self.binds.release(owner)
        else:
            self.udp.release(owner)
            self.udp_sockets -= UDP_SOCKETS_PER_ASSOCIATION

    def _release_on_end(self, event: str, session: Session) -> None:
        if event == "end":
            self.release(session)

    # --- 2. after the request ------------------------------------------------------------------

    def open_request(
        self, session: Session, client: IP, request: Request
    ) -> tuple[Decision | None, str | None]:
        """Judge a request before it is served.

        Returns:
            The rule decision (``None``: it hangs on addresses not resolved yet) and a refusal
            reason for the log when the request must get REP 02 (then nothing is held).
            Otherwise the session holds a slot of its user's session limit until it ends.
        """
        address = literal(request.address)  # a numeric name is its address
        domain = address.atyp == AddressType.DOMAIN
        query = Query(
            client=client,
            user=session.user,
            command=command_of(request),
            host=address.host if domain else None,
            ip=None if domain or request.command == 3 else ip_of(address.host),
            port=None if request.command == 3 else address.port,
        )
        decision = self.ruleset.decide(query)
        if decision is not None:
            session.rule = decision.rule_id
            if not decision.allowed:
                self._ctx.stats.denied[decision.rule_id] += 1
                return decision, f"denied by rule {decision.rule_id}"
        if session.user is not None:
            over = self._open_user(session)
            if over is not None:
                limit, refusal = over
                self._ctx.stats.limited[limit] += 1
                return decision, refusal
        self._queries[session] = query
        return decision, None

    def _open_user(self, session: Session) -> tuple[str, str] | None:
        """Take a slot of the user's limits; else (the limit's name, why) for the log."""
        user = session.user
        assert user is not None
        limits = self._ctx.store.user_limits(user)
        exceeded = self._quota_exceeded(user, limits)
        if exceeded:
            return "quota", f"{exceeded} quota used up"
        limit = limits.max_sessions or self._ctx.config.max_sessions_per_user
        if not self.user_sessions.acquire(user, limit):
            return "user_sessions", f"user {user} has {limit} sessions already"
        rate = self._rates.get(user)
        if rate is None or not rate.matches(limits):
            fresh = _UserRate(_bucket(limits.rate_up), _bucket(limits.rate_down))
            fresh.sessions = rate.sessions if rate else 0
            rate = self._rates[user] = fresh
        rate.sessions += 1
        return None

    def _quota_exceeded(self, user: str, limits: UserLimits) -> str | None:
        if limits.quota_day is None and limits.quota_month is None:
            return None  # usage costs a pass over live sessions: only where a quota applies
        return quota_exceeded(limits, *self._ctx.accountant.period_usage(user, time.time()))

    def max_duration(self, session: Session) -> float | None:
        """The session's lifetime limit: the user's own, else the server's."""
        own = self._ctx.store.user_limits(session.user) if session.user else UserLimits()
        return own.max_session_duration or self._ctx.config.max_session_duration

    def deny_resolved(self, session: Session, ips: list[IP]) -> Decision | None:
        """Judge a name's addresses (CONNECT, BIND); the deny, if any, is counted."""
        query = self._queries.get(session)
        if query is None:
            return None
        decision = self.ruleset.decide_resolved(query, ips)
        session.rule = decision.rule_id
        if decision.allowed:
            return None
        self._ctx.stats.denied[decision.rule_id] += 1
        return decision

    def datagram_check(self, session: Session) -> Callable[[str | None, IP, int], bool]:
        """A per-association judge of datagram targets, cached while the rules stay the same."""
        base = self._queries.get(session)
        cache: dict[tuple[str | None, IP, int], bool] = {}
        ruleset: list[RuleSet] = []

        def allowed(host: str | None, ip: IP, port: int) -> bool:
            if base is None:
                return True
            if ruleset != [self.ruleset]:
                ruleset[:] = [self.ruleset]
                cache.clear()
            key = (host, ip, port)
            if key not in cache:
                if len(cache) >= UDP_DECISIONS:
                    cache.pop(next(iter(cache)))
                q = attrs.evolve(base, host=host, ip=ip, port=port)
                decision = self.ruleset.decide(q) or self.ruleset.default
                cache[key] = decision.allowed
                if not decision.allowed:
                    self._ctx.stats.denied[decision.rule_id] += 1
            return cache[key]

        return allowed

    def _on_event(self, event: str, session: Session) -> None:
        if event == "end" and self._queries.pop(session, None) is not None and session.user:
            self.user_sessions.release(session.user)
            rate = self._rates.get(session.user)
            if rate is not None:
                rate.sessions -= 1
                if rate.sessions <= 0:
                    del self._rates[session.user]

    def end_request(self, session: Session) -> None:
        """Give back what :meth:`open_request` holds for *session* before it judges the
        session's next request (HTTP keep-alive); the session's end does it otherwise."""
        self._on_event("end", session)

    # --- 3. while relaying -------------------------------------------------------------------

    def throttles(self, session: Session) -> tuple[Throttle | None, Throttle | None]:
        """Callbacks that hold a direction to its user's rate; ``None`` where there is none
        (so an unlimited session runs the relay's fast path untouched)."""
        rate = self._rates.get(session.user) if session.user else None
        if rate is None:
            return None, None

        def throttle(direction: str) -> Throttle | None:
            if getattr(rate, direction) is None:
                return None

            async def wait(n: int) -> None:
                bucket = getattr(rate, direction)  # the watcher may swap it after a change
                if bucket is not None:
                    delay = bucket.consume(n, trio.current_time())
                    if delay > 0:
                        await trio.sleep(delay)

            return wait

        return throttle("up"), throttle("down")

    def check_quotas(self) -> int:
        """End the sessions of users over quota and refresh rates; return how many ended."""
        ended = 0
        for user, rate in list(self._rates.items()):
            limits = self._ctx.store.user_limits(user)
            if not rate.matches(limits):
                rate.up, rate.down = _bucket(limits.rate_up), _bucket(limits.rate_down)
            exceeded = self._quota_exceeded(user, limits)
            if exceeded:
                sessions = [s for s in self._ctx.registry if s.user == user]
                log.warning("user %s: %s quota used up; ending %d sessions",
                            quote(user), exceeded, len(sessions))
                self._ctx.stats.limited["quota"] += len(sessions)
                for session in sessions:
                    session.kill(f"{exceeded} quota used up")
                ended += len(sessions)
        return ended

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Check quotas every :data:`WATCH_INTERVAL` seconds until cancelled."""
        task_status.started()
        while True:
            await trio.sleep(WATCH_INTERVAL)
            try:
                self.check_quotas()
            except Exception:  # a store hiccup must not stop the proxy; next tick retries
                log.exception("quota check failed")

    # --- reload ------------------------------------------------------------------------------

    def revoke(self) -> int:
        """After a reload: end the sessions the new rules or user set no longer allow."""
        ended = 0
        for session, query in list(self._queries.items()):
            reason = None
            if session.user is not None and not self._ctx.store.has_user(session.user):
                reason = "reload: user removed"
            else:
                ip = ip_of(session.resolved.rpartition(":")[0].strip("[]")) \
                    if session.resolved and session.command not in ("UDP", "RESOLVE_PTR") \
                    else query.ip  # RESOLVE_PTR's resolved is a name
                decision = self.ruleset.decide(attrs.evolve(query, ip=ip))
                if decision is not None and not decision.allowed:
                    reason = f"reload: denied by rule {decision.rule_id}"
            if reason is not None:
                log.info("session %s (%s): %s", session.id, quote(session.user), reason)
                session.kill(reason)
                ended += 1
        return ended
