"""Access rules from their TOML form (``[[rules]]``): :func:`parse_rules`, checked field by field.

What the fields mean is documented in :mod:`trisocks.policy.rules`; a malformed rule raises
:class:`RuleError` naming the rule and the field at fault.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from trisocks.policy.matching import HostPattern, NetPattern, Network, Rule
from trisocks.policy.routes import ROUTE_FIELDS, RouteError, parse_route

__all__ = [
    "ADMIN",
    "COMMANDS",
    "DEFAULT_RULES",
    "LOCAL",
    "RuleError",
    "groups_used",
    "parse_rules",
]

COMMANDS = ("connect", "bind", "udp", "resolve")
"""``resolve``: Tor's RESOLVE and RESOLVE_PTR (docs/protocols.md)."""
ADMIN = "@admin"
"""The ``to`` entry that stands for the admin endpoint, wherever it listens."""
LOCAL = "@local"
"""The ``to`` and ``from`` entry that stands for this host: every address of its own."""
_FIELDS = {"id", "action", "from", "users", "commands", "to", "ports"} | ROUTE_FIELDS

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
            nets.append(NetPattern(_canonical_net(ipaddress.ip_network(entry, strict=False))))
            continue
        except ValueError:
            pass
        name = entry.rstrip(".").lower()
        suffix = name.startswith("*.")
        name = name[2:] if suffix else name
        if not name or "*" in name or "/" in name or " " in name:
            raise RuleError(f"rule {rule_id!r}: to: {entry!r} is not a CIDR, name or *.suffix")
        hosts.append(HostPattern(name, suffix))
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
    try:
        fields["route"] = parse_route(data, fields["allow"])
    except RouteError as exc:
        raise RuleError(f"rule {rule_id!r}: {exc}") from None
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
