"""Where an allowed request's traffic leaves: a rule's ``egress`` and ``via`` fields.

- ``egress``: source addresses for outbound connections and UDP: a list of IP addresses (picked
  round-robin, or with ``egress_pick = "sticky"`` one per identity), or one IPv6 prefix
  (``"2001:db8:7::/64"``: a random address of it per session). The family of the target
  decides which addresses apply; ``egress_missing`` says what happens when none is of the
  target's family: ``"refuse"`` (the default: REP 03, network unreachable, with the reason in
  the access log) or ``"fallback"`` (the host's default source address).
- ``via``: upstream proxies tried in order, as URLs: ``socks5://[user[:password]@]host:port``
  (names resolved here, the parent gets an address), ``socks5h://...`` (names passed to the
  parent unresolved), ``http://[user[:password]@]host:port`` (HTTP CONNECT). A password may
  instead come from a file: ``?password_file=/etc/trisocks/parent.pw`` (one line).

The first matching rule decides both the action and the route (:class:`Route`); a deny rule
cannot carry one.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

__all__ = [
    "EGRESS_MISSING",
    "EGRESS_PICKS",
    "PARENT_SCHEMES",
    "ROUTE_FIELDS",
    "Parent",
    "Route",
    "parse_parent",
    "parse_route",
]

ROUTE_FIELDS = frozenset({"egress", "egress_pick", "egress_missing", "via"})
EGRESS_PICKS = ("round-robin", "sticky")
EGRESS_MISSING = ("refuse", "fallback")
PARENT_SCHEMES = ("socks5", "socks5h", "http")

IP = ipaddress.IPv4Address | ipaddress.IPv6Address


@attrs.frozen
class Parent:
    """One upstream proxy of a ``via`` list."""

    scheme: str
    """``socks5``, ``socks5h`` or ``http``."""
    host: str
    port: int
    user: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    password_file: Path | None = None
    """Where the password is read from (at connect time), instead of the URL."""

    @property
    def label(self) -> str:
        """How logs, the API and ``/metrics`` name it: no credentials."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def resolves_names(self) -> bool:
        """The parent gets names unresolved (``socks5h``, and HTTP CONNECT, which names the
        host in its request line)."""
        return self.scheme in ("socks5h", "http")


@attrs.frozen
class Route:
    """The route an allow rule gives: egress addresses and/or parents."""

    egress: tuple[IP, ...] = ()
    egress_prefix: ipaddress.IPv6Network | None = None
    egress_pick: str = "round-robin"
    egress_missing: str = "refuse"
    via: tuple[Parent, ...] = ()

    def egress_for(self, version: int) -> tuple[IP, ...]:
        """The listed egress addresses of IP *version* (4 or 6)."""
        return tuple(ip for ip in self.egress if ip.version == version)


class RouteError(ValueError):
    """A route field is malformed (the rules module turns it into a RuleError)."""


def _egress(value: Any) -> dict[str, Any]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise RouteError("egress: expected an address, a list of addresses or one IPv6 prefix")
    if len(items) == 1 and "/" in items[0]:
        try:
            prefix = ipaddress.ip_network(items[0], strict=True)
        except ValueError as exc:
            raise RouteError(f"egress: {exc}") from None
        if prefix.version != 6 or prefix.prefixlen > 126:
            raise RouteError(f"egress: a prefix must be IPv6 and at most /126, got {items[0]}")
        return {"egress_prefix": prefix}
    addresses = []
    for item in items:
        try:
            ip = ipaddress.ip_address(item)
        except ValueError:
            raise RouteError(f"egress: {item!r} is not an IP address (a prefix goes alone)"
                             ) from None
        if ip.is_unspecified or ip.is_multicast:
            raise RouteError(f"egress: {item} cannot be a source address")
        addresses.append(ip)
    if len(set(addresses)) != len(addresses):
        raise RouteError("egress: an address is listed twice")
    return {"egress": tuple(addresses)}


def parse_parent(url: str) -> Parent:
    """One ``via`` URL (module docstring)."""
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise RouteError(f"via: {url!r}: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in PARENT_SCHEMES:
        raise RouteError(f"via: {url!r}: the scheme must be one of {', '.join(PARENT_SCHEMES)}")
    if not parts.hostname or port is None or parts.path not in ("", "/") or parts.fragment:
        raise RouteError(f"via: {url!r}: expected {scheme}://[user[:password]@]host:port")
    query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"password_file"}
    if unknown:
        raise RouteError(f"via: {url!r}: unknown parameter {sorted(unknown)[0]!r}")
    password_file = Path(query["password_file"][0]) if "password_file" in query else None
    user = urllib.parse.unquote(parts.username) if parts.username is not None else None
    password = urllib.parse.unquote(parts.password) if parts.password is not None else None
    if password_file is not None and (password is not None or user is None):
        raise RouteError(f"via: {url!r}: password_file needs a user and no password in the URL")
    if password is not None and user is None:
        raise RouteError(f"via: {url!r}: a password needs a user")
    return Parent(scheme, parts.hostname, port, user, password, password_file)


def parse_route(data: Mapping[str, Any], allow: bool) -> Route | None:
    """The route fields of one rule table (``None`` when it has none).

    Raises:
        RouteError: a field is malformed, or a deny rule carries a route.
    """
    present = ROUTE_FIELDS & set(data)
    if not present:
        return None
    if not allow:
        raise RouteError(f"{sorted(present)[0]}: only an allow rule routes")
    fields: dict[str, Any] = {}
    if "egress" in data:
        fields.update(_egress(data["egress"]))
    for key, choices in (("egress_pick", EGRESS_PICKS), ("egress_missing", EGRESS_MISSING)):
        if key in data:
            if "egress" not in data:
                raise RouteError(f"{key}: needs egress")
            if data[key] not in choices:
                raise RouteError(f"{key}: expected one of {', '.join(choices)}, "
                                 f"got {data[key]!r}")
            fields[key] = data[key]
    if "via" in data:
        items = [data["via"]] if isinstance(data["via"], str) else data["via"]
        if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
            raise RouteError("via: expected a URL or a list of URLs")
        fields["via"] = tuple(parse_parent(item) for item in items)
    return Route(**fields)
