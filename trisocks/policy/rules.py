"""Access rules: an ordered list, first match wins, then an explicit default (as in Dante).

Sans-IO: nothing here resolves a name or reads a clock. The server asks :meth:`RuleSet.decide`
with what it knows; a rule whose destination depends on an address the server has not resolved
yet makes the answer ``None`` ("resolve, then ask once per address").

One :class:`Rule` and its matching are in :mod:`trisocks.policy.matching`, reading rules from
TOML is :mod:`trisocks.policy.rule_parsing`; this module puts them in order and binds them to
this host (:class:`RuleSet`), and re-exports the names of both.

Rules of matching:

1. Every condition a rule names must hold; a condition it leaves out matches anything.
2. ``to`` holds CIDRs, host names (exact, or ``*.suffix`` for names under a suffix, case-blind),
   ``@admin`` (every address and port that reaches the admin listener: with a wildcard bind,
   every local address of that family, both for ``::``) and ``@local`` (this host: loopback,
   ``0.0.0.0/8``, ``::`` and every interface address). It matches when any entry does. A name
   entry looks at the name the client asked; a CIDR looks at the address (the literal, or each
   one the name resolves to). So a request for a name is judged once per resolved address, with
   both known: a name cannot smuggle a denied address past a CIDR rule, and a name rule still
   applies to every address of that name.
3. An address is judged as what the kernel reaches (:mod:`trisocks.policy.addresses`): an
   IPv4-mapped or -compatible IPv6 address as the IPv4 one; ``0.0.0.0/8`` and ``::`` as
   themselves *and* as the loopback address (both must be allowed). Exception: BIND's all-zeros
   DST.ADDR means "any peer" (RFC 1928), not this host: it is judged only as itself, and
   ``@local`` and ``@admin`` do not match it (a CIDR such as ``0.0.0.0/8`` still does).
4. ``from`` holds client CIDRs and ``@local`` (a client on this host); an entry with a leading
   ``!`` excludes. The client must match some plain entry (when there is one) and no ``!``
   entry: ``from = "!@local"`` is "every client not on this host".
5. ``users`` names users (account names: ``alice`` from the store, ``ldap:alice`` from LDAP)
   and ``@group`` entries. ``@staff`` matches a member of the config's group ``staff`` and any
   identity whose source puts it in a group ``staff`` (LDAP groups, the HTTP hook's groups,
   PAM host groups). An unauthenticated session matches only rules without ``users``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from trisocks.policy.addresses import LOCAL_NETWORKS, canonical, judged
from trisocks.policy.matching import IP, Decision, NetPattern, Network, Query, Rule, Users
from trisocks.policy.rule_parsing import (
    ADMIN,
    COMMANDS,
    DEFAULT_RULES,
    LOCAL,
    RuleError,
    groups_used,
    parse_rules,
)

__all__ = [
    "ADMIN",
    "COMMANDS",
    "DEFAULT_RULES",
    "IP",
    "LOCAL",
    "Decision",
    "Network",
    "Query",
    "Rule",
    "RuleError",
    "RuleSet",
    "Users",
    "groups_used",
    "parse_rules",
]


class RuleSet:
    """Rules in order, groups expanded, ``@admin`` bound to where the admin API listens and
    ``@local`` to this host's addresses (*local*: the interfaces' addresses, read by
    :func:`trisocks.policy.addresses.host_networks`; loopback and unspecified always count)."""

    def __init__(
        self,
        rules: Sequence[Rule],
        *,
        default_allow: bool,
        groups: Mapping[str, Iterable[str]] | None = None,
        admin: tuple[str, int] | None = None,
        local: Iterable[IP | Network] = (),
    ) -> None:
        groups = groups or {}
        self.local = _local_nets(local)
        self.rules = _bind_all(rules, admin, self.local, self.local)
        # For BIND's "any peer" (rule 3), @admin and @local leave out the unspecified addresses.
        peer = tuple(n for n in self.local if not n.network_address.is_unspecified)
        self._peer_rules = _bind_all(rules, admin, peer, self.local)
        self.default = Decision(default_allow, "default")
        self._users = [_expand(r.users, groups) for r in self.rules]

    def decide(self, q: Query) -> Decision | None:
        """The first matching rule's decision, the default, or ``None`` when a rule before the
        first sure match depends on ``q.ip`` and ``q.ip`` is not known yet.

        The address is judged in each of its forms (rule 3): the first deny wins."""
        client = canonical(q.client)
        if client != q.client:
            q = attrs.evolve(q, client=client)
        if q.ip is None:
            return self._first(q, self.rules)
        forms = judged(q.ip)
        if q.command == "bind" and forms[0].is_unspecified:  # "any peer" (rule 3)
            return self._first(attrs.evolve(q, ip=forms[0]), self._peer_rules)
        if forms == (q.ip,):
            return self._first(q, self.rules)
        decision = None
        for ip in forms:
            found = self._first(attrs.evolve(q, ip=ip), self.rules)
            if found is None or not found.allowed:
                return found
            decision = decision or found
        return decision

    def _first(self, q: Query, rules: tuple[Rule, ...]) -> Decision | None:
        for rule, users in zip(rules, self._users, strict=True):
            matched = rule.match(q, users)
            if matched is None:
                return None
            if matched:
                return Decision(rule.allow, rule.id, rule.route)
        return self.default

    def decide_resolved(self, q: Query, ips: Iterable[IP]) -> Decision:
        """Judge a name by every address it resolved to: the first deny, else the allow."""
        decision = self.default
        for ip in ips:
            decision = self.decide(attrs.evolve(q, ip=ip)) or self.default
            if not decision.allowed:
                return decision
        return decision


def _expand(entries: frozenset[str] | None, groups: Mapping[str, Iterable[str]]
            ) -> Users | None:
    """A rule's ``users``: names, the members of each config group it names, and the group
    names themselves (a source's groups match them at request time, rule 5)."""
    if entries is None:
        return None
    names = {e for e in entries if not e.startswith("@")}
    wanted = frozenset(entry[1:] for entry in entries - names)
    for group in wanted:
        names.update(groups.get(group, ()))
    return Users(frozenset(names), wanted)


def _local_nets(local: Iterable[IP | Network]) -> tuple[Network, ...]:
    """This host's networks: loopback and unspecified first, then *local* (canonical: an
    IPv4-mapped entry is its IPv4 address), without repeats."""
    nets = dict.fromkeys(LOCAL_NETWORKS)
    for entry in local:
        net = ipaddress.ip_network(entry)
        if net.prefixlen == net.max_prefixlen:
            net = ipaddress.ip_network(canonical(net.network_address))
        nets.setdefault(net)
    return tuple(nets)


def _admin_nets(
    admin: tuple[str, int] | None, local: Sequence[Network]
) -> tuple[NetPattern, ...]:
    """The admin endpoint as networks, on its port. A wildcard host is every local address:
    ``0.0.0.0`` of IPv4; ``::`` of both families (a dual-stack socket takes IPv4 too)."""
    if admin is None:
        return ()
    host, port = admin
    hosts = ["127.0.0.1", "::1"] if host == "localhost" else [host.strip("[]").split("%")[0]]
    nets: list[Network] = []
    for text in hosts:
        ip = canonical(ipaddress.ip_address(text))
        if ip.is_unspecified:
            nets += [n for n in local if ip.version == 6 or n.version == 4]
        else:
            nets.append(ipaddress.ip_network(ip))
    return tuple(NetPattern(n, port) for n in dict.fromkeys(nets))


def _bind_all(
    rules: Sequence[Rule],
    admin: tuple[str, int] | None,
    to_local: tuple[Network, ...],
    from_local: tuple[Network, ...],
) -> tuple[Rule, ...]:
    """*rules* with ``@admin`` and ``@local`` made into networks: *to_local* for destinations
    (and a wildcard admin), *from_local* for clients."""
    admin_nets = _admin_nets(admin, to_local)
    local_nets = tuple(NetPattern(n) for n in to_local)
    bound = []
    for rule in rules:
        changes: dict[str, Any] = {}
        if rule.admin or rule.local:
            changes["nets"] = rule.nets + (admin_nets if rule.admin else ()) + (
                local_nets if rule.local else ())
        if rule.from_local:
            changes["clients"] = rule.clients + from_local
        if rule.not_from_local:
            changes["not_clients"] = rule.not_clients + from_local
        bound.append(attrs.evolve(rule, **changes) if changes else rule)
    return tuple(bound)
