"""Access rules: an ordered list, first match wins, then an explicit default (as in Dante).

Sans-IO: nothing here resolves a name or reads a clock. The server asks :meth:`RuleSet.decide`
with what it knows; a rule whose destination depends on an address the server has not resolved
yet makes the answer ``None`` ("resolve, then ask once per address").

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
5. ``users`` names users and ``@group`` entries; an unauthenticated session matches only rules
   without ``users``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

from trisocks.policy.addresses import LOCAL_NETWORKS, canonical, judged

__all__ = [
    "ADMIN",
    "COMMANDS",
    "DEFAULT_RULES",
    "LOCAL",
    "Decision",
    "Query",
    "Rule",
    "RuleError",
    "RuleSet",
    "parse_rules",
]

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
COMMANDS = ("connect", "bind", "udp", "resolve")
"""``resolve``: Tor's RESOLVE and RESOLVE_PTR (docs/protocols.md)."""
ADMIN = "@admin"
"""The ``to`` entry that stands for the admin endpoint, wherever it listens."""
LOCAL = "@local"
"""The ``to`` and ``from`` entry that stands for this host: every address of its own."""
_FIELDS = {"id", "action", "from", "users", "commands", "to", "ports"}

DEFAULT_RULES: tuple[dict[str, Any], ...] = (
    {"id": "admin-endpoint", "action": "deny", "to": [ADMIN]},
    {"id": "proxy-host", "action": "deny", "from": ["!" + LOCAL], "to": [LOCAL]},
    {"id": "link-local", "action": "deny", "to": ["169.254.0.0/16", "fe80::/10"]},
)
"""The shipped rules (with ``rules_default = "allow"``): everything is allowed except the
proxy's own admin endpoint, the proxy host itself to clients elsewhere (a local client could
reach its services anyway), and link-local addresses, where cloud metadata services live."""


class RuleError(ValueError):
    """A rule is malformed; the message says which rule and why."""


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


@attrs.frozen
class Decision:
    allowed: bool
    rule_id: str
    """The rule that matched, or ``default``."""


@attrs.frozen
class _Host:
    """An exact name or, with ``suffix``, any name under ``.name``."""

    name: str
    suffix: bool

    def matches(self, host: str | None) -> bool:
        if host is None:
            return False
        host = host.rstrip(".").lower()
        return host.endswith("." + self.name) if self.suffix else host == self.name


@attrs.frozen
class _Net:
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
    """One line of policy; the conditions are documented in the module docstring."""

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
    hosts: tuple[_Host, ...] = ()
    nets: tuple[_Net, ...] = ()
    admin: bool = False
    """``to`` includes ``@admin`` (made into ``nets`` by :class:`RuleSet`)."""
    local: bool = False
    """``to`` includes ``@local`` (made into ``nets`` by :class:`RuleSet`)."""
    ports: tuple[tuple[int, int], ...] = ()

    def match(self, q: Query, users: frozenset[str] | None) -> bool | None:
        """True or False, or None when it hangs on the unresolved address."""
        if (self.clients or self.from_local) and not any(
            q.client.version == n.version and q.client in n for n in self.clients
        ):
            return False
        if any(q.client.version == n.version and q.client in n for n in self.not_clients):
            return False
        if users is not None and q.user not in users:
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
                return Decision(rule.allow, rule.id)
        return self.default

    def decide_resolved(self, q: Query, ips: Iterable[IP]) -> Decision:
        """Judge a name by every address it resolved to: the first deny, else the allow."""
        decision = self.default
        for ip in ips:
            decision = self.decide(attrs.evolve(q, ip=ip)) or self.default
            if not decision.allowed:
                return decision
        return decision


def _expand(entries: frozenset[str] | None, groups: Mapping[str, Iterable[str]]) -> Any:
    if entries is None:
        return None
    names = {e for e in entries if not e.startswith("@")}
    for entry in entries - names:
        names.update(groups.get(entry[1:], ()))
    return frozenset(names)


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


def _admin_nets(admin: tuple[str, int] | None, local: Sequence[Network]) -> tuple[_Net, ...]:
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
    return tuple(_Net(n, port) for n in dict.fromkeys(nets))


def _bind_all(
    rules: Sequence[Rule],
    admin: tuple[str, int] | None,
    to_local: tuple[Network, ...],
    from_local: tuple[Network, ...],
) -> tuple[Rule, ...]:
    """*rules* with ``@admin`` and ``@local`` made into networks: *to_local* for destinations
    (and a wildcard admin), *from_local* for clients."""
    admin_nets = _admin_nets(admin, to_local)
    local_nets = tuple(_Net(n) for n in to_local)
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


def _strings(rule_id: str, field: str, value: Any) -> list[str]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise RuleError(f"rule {rule_id!r}: {field}: expected a string or a list of strings")
    return items


def _ports(rule_id: str, value: Any) -> tuple[tuple[int, int], ...]:
    items = value if isinstance(value, list) else [value]
    ranges = []
    for item in items:
        lo_text, _, hi_text = str(item).partition("-")
        try:
            lo, hi = int(lo_text), int(hi_text or lo_text)
        except ValueError:
            raise RuleError(f"rule {rule_id!r}: ports: {item!r} is not N or N-M") from None
        if isinstance(item, bool) or not 0 <= lo <= hi <= 65535:
            raise RuleError(f"rule {rule_id!r}: ports: {item!r} is not a range in 0..65535")
        ranges.append((lo, hi))
    return tuple(ranges)


_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def _canonical_net(net: Network) -> Network:
    """A rule's network as addresses are judged: inside ``::ffff:0:0/96`` (IPv4-mapped), the
    IPv4 network it maps (``::ffff:10.0.0.0/104`` is ``10.0.0.0/8``)."""
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_MAPPED):
        return ipaddress.IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
    return net


def _clients(rule_id: str, value: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {"clients": [], "not_clients": []}
    for entry in _strings(rule_id, "from", value):
        negated = entry.startswith("!")
        entry = entry[1:].strip() if negated else entry.strip()
        if entry.lower() == LOCAL:
            fields["not_from_local" if negated else "from_local"] = True
            continue
        try:
            net = _canonical_net(ipaddress.ip_network(entry, strict=False))
        except ValueError as exc:
            raise RuleError(f"rule {rule_id!r}: from: {exc}") from None
        fields["not_clients" if negated else "clients"].append(net)
    fields["clients"] = tuple(fields["clients"])
    fields["not_clients"] = tuple(fields["not_clients"])
    return fields


def _destinations(rule_id: str, value: Any) -> dict[str, Any]:
    hosts, nets, admin, local = [], [], False, False
    for entry in _strings(rule_id, "to", value):
        if entry == ADMIN:
            admin = True
            continue
        if entry.lower() == LOCAL:
            local = True
            continue
        try:
            nets.append(_Net(_canonical_net(ipaddress.ip_network(entry, strict=False))))
            continue
        except ValueError:
            pass
        name = entry.rstrip(".").lower()
        suffix = name.startswith("*.")
        name = name[2:] if suffix else name
        if not name or "*" in name or "/" in name or " " in name:
            raise RuleError(f"rule {rule_id!r}: to: {entry!r} is not a CIDR, name or *.suffix")
        hosts.append(_Host(name, suffix))
    return {"hosts": tuple(hosts), "nets": tuple(nets), "admin": admin, "local": local}


def _rule(index: int, data: Any) -> Rule:
    if not isinstance(data, Mapping):
        raise RuleError(f"rule {index}: expected a table")
    rule_id = str(data.get("id") or f"rule-{index}")
    unknown = set(data) - _FIELDS
    if unknown:
        raise RuleError(f"rule {rule_id!r}: unknown field {sorted(unknown)[0]!r}")
    action = data.get("action")
    if action not in ("allow", "deny"):
        raise RuleError(f"rule {rule_id!r}: action must be allow or deny, got {action!r}")
    fields: dict[str, Any] = {"id": rule_id, "allow": action == "allow"}
    if "from" in data:
        fields.update(_clients(rule_id, data["from"]))
    if "users" in data:
        fields["users"] = frozenset(_strings(rule_id, "users", data["users"]))
    if "commands" in data:
        commands = {c.lower() for c in _strings(rule_id, "commands", data["commands"])}
        if not commands <= set(COMMANDS):
            raise RuleError(f"rule {rule_id!r}: commands: expected some of {', '.join(COMMANDS)}")
        fields["commands"] = frozenset(commands)
    if "to" in data:
        fields.update(_destinations(rule_id, data["to"]))
    if "ports" in data:
        fields["ports"] = _ports(rule_id, data["ports"])
    return Rule(**fields)


def parse_rules(data: Any) -> tuple[Rule, ...]:
    """Rules from their TOML form (a list of tables); ids default to ``rule-N`` and must be
    unique, so a log line naming a rule is never ambiguous.

    Raises:
        RuleError: naming the rule and the field at fault.
    """
    if not isinstance(data, list | tuple):
        raise RuleError("expected a list of rule tables ([[rules]])")
    rules = tuple(_rule(i, item) for i, item in enumerate(data, start=1))
    seen: set[str] = set()
    for rule in rules:
        if rule.id in seen:
            raise RuleError(f"rule id {rule.id!r} is used twice")
        seen.add(rule.id)
    return rules


def groups_used(rules: Iterable[Rule]) -> set[str]:
    """The ``@group`` names the rules refer to (for the config check: every one must exist)."""
    return {u[1:] for r in rules for u in (r.users or ()) if u.startswith("@")}
