"""The access rules applied to requests, resolved addresses and datagram targets.

After the request (:func:`open_request`): the rules on what the client asked, then the user's
session limit and quota (:class:`trisocks.server.user_limits.UserLimiter`). CONNECT to a name
is judged again per resolved address by :mod:`trisocks.server.dial`, which connects only to
addresses it judged (:meth:`Judge.deny_resolved`); UDP datagrams are judged per target
(:meth:`Judge.datagram_check`). Denials are counted in ``stats.denied`` by rule id.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from trisocks.net import ip_of
from trisocks.policy.addresses import Network, host_networks
from trisocks.policy.routes import Route
from trisocks.policy.rules import IP, Decision, Query, RuleSet
from trisocks.protocol import AddressType, Command, Request
from trisocks.server.dial import literal
from trisocks.sessions import Session, SessionRegistry

if TYPE_CHECKING:
    from trisocks.config import Config
    from trisocks.server.stats import Stats
    from trisocks.server.user_limits import UserLimiter

__all__ = ["UDP_DECISIONS", "Judge", "command_of", "end_request", "open_request"]

UDP_DECISIONS = 256
"""Per-association cache of datagram decisions (the rules are pure, so caching is exact)."""

_RULE_COMMANDS = {Command.CONNECT: "connect", Command.BIND: "bind", Command.UDP_ASSOCIATE: "udp",
                  Command.RESOLVE: "resolve", Command.RESOLVE_PTR: "resolve"}


def command_of(request: Request) -> str:
    """The request's command as the rules name it."""
    return _RULE_COMMANDS[request.command]


class Judge:
    """The rules of the running config, and the query each served request was judged by.

    *config* gives the running config (a reload replaces it: the rules are rebuilt when they
    change); *admin_address* where the admin API really listens (``@admin``), ``None`` while
    off; denials are counted in *stats*; *registry* tells when a session ends (its query is
    dropped).
    """

    def __init__(
        self,
        config: Callable[[], Config],
        admin_address: Callable[[], tuple[str, int] | None],
        stats: Stats,
        registry: SessionRegistry,
    ) -> None:
        self._config = config
        self._admin_address = admin_address
        self._stats = stats
        self._queries: dict[Session, Query] = {}
        self._routes: dict[Session, Route] = {}
        self._ruleset_key: tuple[object, ...] = ()
        self._ruleset: RuleSet | None = None
        self.local: frozenset[Network] = frozenset()
        """This host's addresses (``@local``): read at start and on reload."""
        self.read_local_addresses()
        registry.on_end(self.end_request)

    def read_local_addresses(self) -> None:
        """Read this host's interface addresses again (``@local``, and ``@admin`` on a
        wildcard): at start, and on reload (:func:`trisocks.server.reload.reload_config`)."""
        self.local = host_networks()

    @property
    def ruleset(self) -> RuleSet:
        """The rules of the current config, bound to where the admin API really listens and
        to this host's addresses."""
        config = self._config()
        admin = self._admin_address()
        key = (config.rules, config.rules_default, config.groups, admin, self.local)
        if self._ruleset is None or key != self._ruleset_key:
            self._ruleset_key = key
            self._ruleset = RuleSet(
                config.rules,
                default_allow=config.rules_default == "allow",
                groups=dict(config.groups),
                admin=admin,
                local=sorted(self.local, key=lambda n: (n.version, n)),
            )
        return self._ruleset

    @property
    def queries(self) -> dict[Session, Query]:
        """The query each session's request was allowed by (:meth:`hold`), until it ends."""
        return self._queries

    def judge_request(
        self, session: Session, client: IP, request: Request
    ) -> tuple[Decision | None, str | None, Query]:
        """Judge a request by the rules (the decision's rule becomes the session's).

        Returns:
            The decision (``None``: it hangs on addresses not resolved yet), a refusal reason
            for the log when a rule denies it (counted in ``stats.denied``), and the query it
            was judged by.
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
            groups=session.groups,
        )
        decision = self.ruleset.decide(query)
        if decision is not None:
            session.rule = decision.rule_id
            self._keep_route(session, decision)
            if not decision.allowed:
                self._stats.denied[decision.rule_id] += 1
                return decision, f"denied by rule {decision.rule_id}", query
        return decision, None, query

    def hold(self, session: Session, query: Query) -> None:
        """Keep the *query* *session*'s request was allowed by: its resolved addresses and
        datagrams are judged from it, and a reload judges it again."""
        self._queries[session] = query

    def deny_resolved(self, session: Session, ips: list[IP]) -> Decision | None:
        """Judge a name's addresses (CONNECT, BIND); the deny, if any, is counted."""
        query = self._queries.get(session)
        if query is None:
            return None
        decision = self.ruleset.decide_resolved(query, ips)
        session.rule = decision.rule_id
        if decision.allowed:
            self._keep_route(session, decision)
            return None
        self._stats.denied[decision.rule_id] += 1
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
                    self._stats.denied[decision.rule_id] += 1
            return cache[key]

        return allowed

    def _keep_route(self, session: Session, decision: Decision) -> None:
        if decision.route is not None and decision.allowed:
            self._routes[session] = decision.route
        else:
            self._routes.pop(session, None)

    def route_of(self, session: Session) -> Route | None:
        """The route of the rule that allowed *session*'s request (:mod:`trisocks.policy.
        routes`): known once the request is decided, for a name that hangs on its addresses
        once :meth:`deny_resolved` has judged them; ``None``: direct, from the default address.
        A reload does not change a live session's route."""
        return self._routes.get(session)

    def end_request(self, session: Session) -> None:
        """Drop the query and route of *session*'s request: before its next one is judged
        (HTTP keep-alive), and at its end."""
        self._queries.pop(session, None)
        self._routes.pop(session, None)


def open_request(
    judge: Judge, users: UserLimiter, session: Session, client: IP, request: Request
) -> tuple[Decision | None, str | None]:
    """Judge a request before it is served: the rules, then (authenticated) the user's quota
    and session limit.

    Returns:
        The rule decision (``None``: it hangs on addresses not resolved yet) and a refusal
        reason for the log when the request must get REP 02 (then nothing is held; a limit's
        refusal is counted in ``stats.limited``). Otherwise the session holds its query and a
        slot of its user's session limit until :func:`end_request` or its end.
    """
    decision, refusal, query = judge.judge_request(session, client, request)
    if refusal is not None:
        return decision, refusal
    if session.user is not None:
        over = users.open(session)
        if over is not None:  # counted in stats.limited
            return decision, over
    judge.hold(session, query)
    return decision, None


def end_request(judge: Judge, users: UserLimiter, session: Session) -> None:
    """Give back what :func:`open_request` holds for *session* before the session's next
    request is judged (HTTP keep-alive); the session's end does it otherwise."""
    judge.end_request(session)
    users.end_request(session)
