"""Source addresses for outbound traffic: a rule's ``egress`` (:mod:`trisocks.policy.routes`).

Rules this module keeps:

1. The target's family decides: an IPv4 target leaves from one of the rule's IPv4 addresses,
   an IPv6 target from one of its IPv6 addresses or from its IPv6 prefix. With none of the
   target's family, ``egress_missing`` decides: ``"refuse"`` fails the attempt with
   ``ENETUNREACH`` (REP 03, and the reason ``egress: no IPv4 address in rule 'x'``),
   ``"fallback"`` leaves from the host's default source address.
2. A list is picked round-robin (one counter per route, server-wide) or, with
   ``egress_pick = "sticky"``, by a stable hash of the identity (the account, or the client's
   IP when anonymous), so an identity keeps its address while the list stays the same.
3. A prefix gives each session one random address of it, kept for all its connections.
4. A UDP association keeps one source per family for its whole life (round-robin picks once
   per association), so a target always sees the same peer.
5. Outbound sockets are bound before they connect with ``IP_FREEBIND`` / ``IPV6_FREEBIND``
   set: an address of a locally routed prefix need not be on an interface.

:func:`check_egress` is what ``serve`` and ``trisocks check`` run at start.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import secrets
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from trisocks.net import ip_of
from trisocks.policy.routes import IP, Route
from trisocks.sessions import Session, SessionRegistry

if TYPE_CHECKING:
    from trisocks.config import Config

__all__ = ["IPV6_FREEBIND", "IP_FREEBIND", "Egress", "NoEgress", "bind_source", "check_egress",
           "local_routes"]

IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)
"""Linux's ``IP_FREEBIND`` (Python before 3.12 lacks the constant)."""
IPV6_FREEBIND = getattr(socket, "IPV6_FREEBIND", 78)
"""Linux's ``IPV6_FREEBIND``."""
RTF_LOCAL = 0x80000000
"""The flag of a ``local`` route in ``/proc/net/ipv6_route``."""
IPV6_ROUTES = Path("/proc/net/ipv6_route")
MAX_COUNTERS = 4096
"""Round-robin counters kept (one per route); beyond this they start again from zero."""

_FAMILY_VERSION = {socket.AF_INET: 4, socket.AF_INET6: 6}


class NoEgress(OSError):
    """The route has no source address of the target's family and says ``refuse``
    (``ENETUNREACH``: REP 03)."""

    def __init__(self, version: int, rule: str | None) -> None:
        super().__init__(errno.ENETUNREACH, f"egress: no IPv{version} address in rule {rule!r}")


class Egress:
    """Picks source addresses for the server's sessions (module docstring). *registry* tells
    when a session ends: what it kept is dropped."""

    def __init__(self, registry: SessionRegistry) -> None:
        self._counters: dict[tuple[Route, int], int] = {}
        self._kept: dict[Session, dict[tuple[Route, int], IP | None]] = {}
        """Per session, by route and IP version: what it keeps (an HTTP client's next
        request may be allowed by another rule)."""
        registry.on_end(self._forget)

    def _forget(self, session: Session) -> None:
        self._kept.pop(session, None)

    def source(self, session: Session, route: Route | None, version: int,
               keep: bool = False) -> IP | None:
        """The source address for an IP *version* target of *session* under *route*
        (``None``: the host's default). *keep*: the same answer for the rest of the session
        (a UDP association); a prefix's address is always kept.

        Raises:
            NoEgress: none of that family, and the route says ``refuse``.
        """
        if not has_egress(route):
            return None
        assert route is not None
        kept = self._kept.get(session, {})
        if (route, version) in kept:
            return kept[route, version]
        prefix = route.egress_prefix
        if prefix is not None and version == 6:
            chosen: IP | None = prefix[1 + secrets.randbelow(prefix.num_addresses - 1)]
            keep = True
        else:
            addresses = route.egress_for(version)
            if not addresses:
                if route.egress_missing == "refuse":
                    raise NoEgress(version, session.rule)
                return None
            chosen = addresses[self._index(session, route, version, len(addresses))]
        if keep:
            self._kept.setdefault(session, {})[route, version] = chosen
        return chosen

    def _index(self, session: Session, route: Route, version: int, count: int) -> int:
        if route.egress_pick == "sticky":
            identity = session.user if session.user is not None else str(session.client_ip)
            digest = hashlib.blake2b(identity.encode(), digest_size=8).digest()
            return int.from_bytes(digest, "big") % count
        key = (route, version)
        if key not in self._counters and len(self._counters) >= MAX_COUNTERS:
            self._counters.clear()
        n = self._counters.get(key, 0)
        self._counters[key] = n + 1
        return n % count

    def sources(
        self, session: Session, route: Route | None, families: Iterable[socket.AddressFamily]
    ) -> dict[socket.AddressFamily, IP | None] | None:
        """The source per target family for one outbound connection; a family the route
        refuses is left out (its targets are not tried). ``None``: the route has no egress
        (every family from the kernel's choice).

        Raises:
            NoEgress: every family is refused.
        """
        if not has_egress(route):
            return None
        chosen: dict[socket.AddressFamily, IP | None] = {}
        refused: NoEgress | None = None
        for family in dict.fromkeys(families):
            try:
                chosen[family] = self.source(session, route, _FAMILY_VERSION[family])
            except NoEgress as exc:
                refused = exc
        if not chosen and refused is not None:
            raise refused
        return chosen

    async def udp_socket(self, session: Session, route: Route | None,
                         family: socket.AddressFamily) -> trio.socket.SocketType:
        """A UDP socket of *family* (IPv6 only) for *session*'s association, bound to the
        source the route gives that family, kept for the association (rule 4); the first
        one bound is ``Session.egress``.

        Raises:
            OSError: it cannot be made or bound (then it is closed); ``NoEgress``.
        """
        source = self.source(session, route, _FAMILY_VERSION[family], keep=True)
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            await bind_source(sock, source)
        except BaseException:
            sock.close()
            raise
        if session.egress is None and source is not None:
            session.egress = source
        return sock

    def connected(self, session: Session, route: Route | None,
                  sock: trio.socket.SocketType) -> None:
        """Note where *session*'s connection left from (``Session.egress``), when its route
        has egress (the host's default address too, after a ``fallback``)."""
        if has_egress(route):
            session.egress = ip_of(sock.getsockname()[0])


def has_egress(route: Route | None) -> bool:
    """*route* gives source addresses (a list or a prefix)."""
    return route is not None and (bool(route.egress) or route.egress_prefix is not None)


async def bind_source(sock: trio.socket.SocketType, source: IP | None) -> None:
    """Bind *sock* (not yet connected) to *source*, port 0, with ``IP_FREEBIND`` /
    ``IPV6_FREEBIND``; ``None`` leaves it to the kernel.

    Raises:
        OSError: the option or the bind failed.
    """
    if source is None:
        return
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
        if source.version == 4:  # a dual-stack socket sending to IPv4
            source = ipaddress.IPv6Address(f"::ffff:{source}")
        await sock.bind((str(source), 0, 0, 0))
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        await sock.bind((str(source), 0))


def local_routes(path: Path = IPV6_ROUTES) -> list[ipaddress.IPv6Network]:
    """This host's IPv6 ``local`` routes (``ip -6 route add local PREFIX dev lo``), read from
    ``/proc/net/ipv6_route``; empty when it cannot be read."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    routes = []
    for line in lines:
        fields = line.split()
        if len(fields) < 9 or not int(fields[8], 16) & RTF_LOCAL:
            continue
        address = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
        routes.append(ipaddress.IPv6Network((address, int(fields[1], 16))))
    return routes


def _address_problem(ip: IP) -> str | None:
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.bind((str(ip), 0))
    except OSError as exc:
        return f"egress {ip} is not an address of this host ({exc.strerror or exc})"
    return None


def _prefix_problem(prefix: ipaddress.IPv6Network, routes: list[ipaddress.IPv6Network]
                    ) -> str | None:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
    except OSError as exc:
        return f"egress {prefix}: IPV6_FREEBIND does not work here ({exc.strerror or exc})"
    if not any(prefix.subnet_of(route) for route in routes):
        return (f"egress {prefix}: no local route covers it (ip -6 route add local {prefix} "
                "dev lo)")
    return None


def check_egress(config: Config) -> list[str]:
    """What would keep the rules' egress addresses from working on this host: an address
    that cannot be bound (with FREEBIND off: it must be this host's), a prefix without
    ``IPV6_FREEBIND`` or a local route covering it. One line per problem, naming the rule."""
    problems: list[str] = []
    routes: list[ipaddress.IPv6Network] | None = None
    for rule in config.rules:
        route = rule.route
        if route is None:
            continue
        found = [_address_problem(ip) for ip in route.egress]
        if route.egress_prefix is not None:
            routes = local_routes() if routes is None else routes
            found.append(_prefix_problem(route.egress_prefix, routes))
        problems += [f"rules: rule {rule.id!r}: {p}" for p in found if p is not None]
    return problems


