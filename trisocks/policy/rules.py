"""Access rules: an ordered list, first match wins, then an explicit default (as in Dante).

Sans-IO: nothing here resolves a name or reads a clock. The server asks :meth:`RuleSet.decide`
with what it knows; a rule whose destination depends on an address the server has not resolved
yet makes the answer ``None`` ("resolve, then ask once per address").

Rules of matching:

1. Every condition a rule names must hold; a condition it leaves out matches anything.
2. ``to`` holds CIDRs, host names (exact, or ``*.suffix`` for names under a suffix, case-blind)
   and ``@admin`` (the admin endpoint). It matches when any entry does. A name entry looks at
   the name the client asked; a CIDR looks at the address (the literal, or each one the name
   resolves to). So a request for a name is judged once per resolved address, with both known:
   a name cannot smuggle a denied address past a CIDR rule, and a name rule still applies to
   every address of that name.
3. ``users`` names users and ``@group`` entries; an unauthenticated session matches only rules
   without ``users``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import attrs

__all__ = [
    "ADMIN",
    "COMMANDS",
    "DEFAULT_RULES",
    "Decision",
    "Query",
    "Rule",
    "RuleError",
    "RuleSet",
    "parse_rules",
]

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
COMMANDS = ("connect", "bind", "udp")
ADMIN = "@admin"
"""The ``to`` entry that stands for the admin endpoint, wherever it listens."""
_FIELDS = {"id", "action", "from", "users", "commands", "to", "ports"}

DEFAULT_RULES: tuple[dict[str, Any], ...] = (
    {"id": "admin-endpoint", "action": "deny", "to": [ADMIN]},
    {"id": "link-local", "action": "deny", "to": ["169.254.0.0/16", "fe80::/10"]},
)
"""The shipped rules (with ``rules_default = "allow"``): everything is allowed except the
proxy's own admin endpoint and link-local addresses, where cloud metadata services live."""


class RuleError(ValueError):
    """A rule is malformed; the message says which rule and why."""


@attrs.frozen
class Query:
    """What a request is judged on."""

    client: IP
    user: str | None
    command: str
    """``connect``, ``bind`` or ``udp``."""
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
    users: frozenset[str] | None = None
    commands: frozenset[str] | None = None
    hosts: tuple[_Host, ...] = ()
    nets: tuple[_Net, ...] = ()
    admin: bool = False
    """``to`` includes ``@admin`` (made into ``nets`` by :class:`RuleSet`)."""
    ports: tuple[tuple[int, int], ...] = ()

    def match(self, q: Query, users: frozenset[str] | None) -> bool | None:
        """True or False, or None when it hangs on the unresolved address."""
        if self.clients and not any(
            q.client.version == n.version and q.client in n for n in self.clients
        ):
            return False
        if users is not None and q.user not in users:
            return False
        if self.commands is not None and q.command not in self.commands:
            return False
        to = bool(self.hosts or self.nets or self.admin)  # @admin without an admin: nothing
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
    """Rules in order, groups expanded, ``@admin`` bound to where the admin API listens."""

    def __init__(
        self,
        rules: Sequence[Rule],
        *,
        default_allow: bool,
        groups: Mapping[str, Iterable[str]] | None = None,
        admin: tuple[str, int] | None = None,
    ) -> None:
        groups = groups or {}
        admin_nets = _admin_nets(admin)
        self.rules = tuple(
            attrs.evolve(r, nets=r.nets + admin_nets) if r.admin else r for r in rules
        )
        self.default = Decision(default_allow, "default")
        self._users = [_expand(r.users, groups) for r in self.rules]

    def decide(self, q: Query) -> Decision | None:
        """The first matching rule's decision, the default, or ``None`` when a rule before the
        first sure match depends on ``q.ip`` and ``q.ip`` is not known yet."""
        for rule, users in zip(self.rules, self._users, strict=True):
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


def _admin_nets(admin: tuple[str, int] | None) -> tuple[_Net, ...]:
    """The admin endpoint as networks; an unspecified host (all interfaces) is reachable on
    every loopback address too."""
    if admin is None:
        return ()
    host, port = admin
    hosts = ["127.0.0.1", "::1"] if host == "localhost" else [host]
    nets = [ipaddress.ip_network(h) for h in hosts]
    if any(n.network_address.is_unspecified for n in nets):
        nets += [ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128")]
    return tuple(_Net(n, port) for n in nets)


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


def _destinations(rule_id: str, value: Any) -> dict[str, Any]:
    hosts, nets, admin = [], [], False
    for entry in _strings(rule_id, "to", value):
        if entry == ADMIN:
            admin = True
            continue
        try:
            nets.append(_Net(ipaddress.ip_network(entry, strict=False)))
            continue
        except ValueError:
            pass
        name = entry.rstrip(".").lower()
        suffix = name.startswith("*.")
        name = name[2:] if suffix else name
        if not name or "*" in name or "/" in name or " " in name:
            raise RuleError(f"rule {rule_id!r}: to: {entry!r} is not a CIDR, name or *.suffix")
        hosts.append(_Host(name, suffix))
    return {"hosts": tuple(hosts), "nets": tuple(nets), "admin": admin}


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
        try:
            clients = _strings(rule_id, "from", data["from"])
            fields["clients"] = tuple(ipaddress.ip_network(c, strict=False) for c in clients)
        except ValueError as exc:
            raise RuleError(f"rule {rule_id!r}: from: {exc}") from None
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
