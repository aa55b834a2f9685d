"""One access rule and how it matches a query: :class:`Query`, :class:`Rule`, :class:`Decision`.

The conditions a rule holds and what each one means are documented in
:mod:`trisocks.policy.rules`. Rules are read by :mod:`trisocks.policy.rule_parsing` and put
in order, bound to this host, by :class:`~trisocks.policy.rules.RuleSet`.
"""

from __future__ import annotations

import ipaddress

import attrs

from trisocks.policy.routes import Route

__all__ = ["IP", "Decision", "HostPattern", "NetPattern", "Network", "Query", "Rule", "Users"]

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@attrs.frozen
class Query:
    """What a request is judged on."""

    client: IP
    user: str | None
    command: str
    """``connect``, ``bind``, ``udp`` or ``resolve``."""
    host: str | None
    """The name the client asked for; ``None`` when it sent an address."""
    ip: IP | None
    """The destination address; ``None`` while a name is unresolved (or for UDP ASSOCIATE
    itself, whose destination comes with each datagram)."""
    port: int | None
    groups: frozenset[str] = frozenset()
    """The groups the user's source gave (LDAP groups, the hook's, PAM host groups): a rule's
    ``@group`` entry matches them as well as the config's ``groups`` table."""


@attrs.frozen
class Users:
    """A rule's ``users`` bound to the config: *names* (listed users and the members of the
    config's groups) and *groups* (every ``@group`` the rule names, for groups that come from
    the identity's source)."""

    names: frozenset[str] = frozenset()
    groups: frozenset[str] = frozenset()

    def matches(self, user: str | None, groups: frozenset[str]) -> bool:
        """An unauthenticated session (*user* ``None``) never matches."""
        if user is None:
            return False
        return user in self.names or not self.groups.isdisjoint(groups)


@attrs.frozen
class Decision:
    allowed: bool
    rule_id: str
    """The rule that matched, or ``default``."""
    route: Route | None = None
    """Where the traffic leaves (:mod:`trisocks.policy.routes`); ``None``: from this host's
    default address, directly."""


@attrs.frozen
class HostPattern:
    """A ``to`` name: an exact name or, with ``suffix``, any name under ``.name``."""

    name: str
    suffix: bool

    def matches(self, host: str | None) -> bool:
        if host is None:
            return False
        host = host.rstrip(".").lower()
        return host.endswith("." + self.name) if self.suffix else host == self.name


@attrs.frozen
class NetPattern:
    """A ``to`` network (a CIDR, or one network of ``@admin`` or ``@local``)."""

    network: Network
    port: int | None = None
    """Set for ``@admin``: only this port of these addresses."""

    def matches(self, ip: IP | None, port: int | None) -> bool | None:
        if ip is None:
            return None
        if ip.version != self.network.version or ip not in self.network:
            return False
        return self.port is None or port == self.port


@attrs.frozen
class Rule:
    """One line of policy; the conditions are documented in :mod:`trisocks.policy.rules`."""

    id: str
    allow: bool
    clients: tuple[Network, ...] = ()
    from_local: bool = False
    """``from`` includes ``@local`` (made into ``clients`` by :class:`RuleSet`)."""
    not_clients: tuple[Network, ...] = ()
    """``from`` entries with ``!``: a client in one of them never matches."""
    not_from_local: bool = False
    """``from`` includes ``!@local`` (made into ``not_clients`` by :class:`RuleSet`)."""
    users: frozenset[str] | None = None
    commands: frozenset[str] | None = None
    hosts: tuple[HostPattern, ...] = ()
    nets: tuple[NetPattern, ...] = ()
    admin: bool = False
    """``to`` includes ``@admin`` (made into ``nets`` by :class:`RuleSet`)."""
    local: bool = False
    """``to`` includes ``@local`` (made into ``nets`` by :class:`RuleSet`)."""
    ports: tuple[tuple[int, int], ...] = ()
    route: Route | None = None
    """``egress`` and ``via`` of an allow rule (:mod:`trisocks.policy.routes`)."""

    def match(self, q: Query, users: Users | None) -> bool | None:
        """True or False, or None when it hangs on the unresolved address."""
        if (self.clients or self.from_local) and not any(
            q.client.version == n.version and q.client in n for n in self.clients
        ):
            return False
        if any(q.client.version == n.version and q.client in n for n in self.not_clients):
            return False
        if users is not None and not users.matches(q.user, q.groups):
            return False
        if self.commands is not None and q.command not in self.commands:
            return False
        to = bool(self.hosts or self.nets or self.admin or self.local)  # @admin w/o admin: none
        if not (to or self.ports):
            return True
        if q.port is None:
            return None  # UDP ASSOCIATE: judged again per datagram
        if self.ports and not any(lo <= q.port <= hi for lo, hi in self.ports):
            return False
        if not to:
            return True
        if any(h.matches(q.host) for h in self.hosts):
            return True
        results = [n.matches(q.ip, q.port) for n in self.nets]
        return True if True in results else None if None in results else False
