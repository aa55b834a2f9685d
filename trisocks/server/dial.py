"""Outbound CONNECT: resolve once, judge every address, connect only to judged addresses.

``trio.open_tcp_stream(name)`` would resolve the name itself, after we had checked it; a name
whose records change in between (DNS rebinding) would reach an address no rule ever saw. So
the name is resolved here, once; the rules see every address; and the connection attempts use
exactly those addresses (as the kernel reaches them: :func:`reach`), staggered as in RFC 8305
(Happy Eyeballs): families interleaved, the next attempt starting when one fails or after
``delay`` seconds, the first to connect winning.

A DOMAINNAME the resolver would read as a number (``127.1``, ``0x7f.0.0.1``, ``0``) is that
address (:func:`literal`): judged and dialed as it, never looked up.
"""

from __future__ import annotations

import functools
import ipaddress
import itertools
import socket
from collections.abc import Callable, Mapping
from typing import Any

import attrs
import trio

from trisocks.net import ip_of
from trisocks.policy.addresses import numeric_host, reached
from trisocks.policy.rules import IP, Decision
from trisocks.protocol import Address, AddressType
from trisocks.server import resolver
from trisocks.server.egress import bind_source

__all__ = ["Denied", "NameCache", "connect_any", "dial", "literal", "lookup", "reach", "resolve"]

Target = tuple[socket.AddressFamily, Any]
"""A family and a socket address to connect to."""
Sources = Mapping[socket.AddressFamily, IP | None]
"""The source address to connect from, per family (``None``: the kernel's choice)."""


class Denied(Exception):
    """A resolved address of the target is denied by the rules."""

    def __init__(self, decision: Decision) -> None:
        super().__init__(f"denied by rule {decision.rule_id}")
        self.decision = decision


def _wire_name(host: str) -> bytes:
    """*host* as the resolver gets it. Given a ``str``, Python's ``getaddrinfo`` runs the
    ``idna`` codec, which raises ``UnicodeError`` (not an OSError) for a label over 63 bytes,
    an empty label or a name over 253 bytes: a DST.ADDR any client may send (RFC 1928 allows
    1..255 bytes). ASCII goes to the resolver as it came; other UTF-8 is IDNA-encoded, and a
    name that cannot be is "not known".

    Raises:
        socket.gaierror: the name cannot be encoded for the resolver.
    """
    if host.isascii():
        return host.encode("ascii")
    try:
        return host.encode("idna")
    except UnicodeError:
        raise socket.gaierror(socket.EAI_NONAME, f"name cannot be IDNA-encoded: {host!r}") from None


def literal(address: Address) -> Address:
    """*address*, with a numeric DOMAINNAME made the IP literal it spells (``127.1`` ->
    ``127.0.0.1``; :func:`trisocks.policy.addresses.numeric_host`)."""
    if address.atyp != AddressType.DOMAIN:
        return address
    ip = numeric_host(address.host)
    return address if ip is None else Address.of(str(ip), address.port)


@functools.lru_cache(maxsize=4096)
def reach(target: Target) -> Target:
    """*target* as the kernel reaches it, which is what is dialed: an IPv4-mapped or
    -compatible IPv6 address as IPv4, ``0.0.0.0`` and ``::`` as loopback
    (:func:`trisocks.policy.addresses.reached`)."""
    sockaddr = target[1]
    ip = ipaddress.ip_address(sockaddr[0])
    to = reached(ip)
    if to == ip:
        return target
    if to.version == 4:
        return socket.AF_INET, (str(to), sockaddr[1])
    return socket.AF_INET6, (str(to), sockaddr[1], 0, 0)


async def lookup(host: str, port: int | None, type: int) -> list[Any]:
    """``getaddrinfo`` for a DST.ADDR domain, by the server's resolver (the ``hosts`` table,
    then ``resolvers`` or the system's: :mod:`trisocks.server.resolver`): never raises
    anything but OSError.

    Raises:
        OSError: the name does not resolve (``socket.gaierror``).
    """
    return await resolver.current().getaddrinfo(_wire_name(host), port, type)


async def resolve(address: Address) -> list[Target]:
    """The addresses to try for *address*, families interleaved (RFC 8305 §4).

    Raises:
        OSError: the name does not resolve (``socket.gaierror``).
    """
    address = literal(address)
    if address.atyp != AddressType.DOMAIN:
        family = socket.AF_INET6 if address.atyp == AddressType.IPV6 else socket.AF_INET
        return [(family, (address.host, address.port))]
    infos = await lookup(address.host, address.port, socket.SOCK_STREAM)
    by_family: dict[int, list[Target]] = {}
    for family, _type, _proto, _name, sockaddr in infos:
        target = (family, sockaddr)
        if target not in by_family.setdefault(family, []):
            by_family[family].append(target)
    mixed = itertools.zip_longest(*by_family.values())
    return [t for group in mixed for t in group if t is not None]


async def _connect(target: Target, source: IP | None = None) -> trio.socket.SocketType:
    """One connection attempt, from *source* when given (bound first, with FREEBIND:
    :func:`trisocks.server.egress.bind_source`); the socket is closed unless it is returned.

    Raises:
        OSError: the attempt failed.
    """
    sock = trio.socket.socket(target[0], socket.SOCK_STREAM)
    try:
        await bind_source(sock, source)
        await sock.connect(target[1])
    except BaseException:
        sock.close()
        raise
    return sock


async def connect_any(
    targets: list[Target], delay: float, sources: Sources | None = None
) -> trio.SocketStream:
    """Connect to the first of *targets* that answers, starting one attempt every *delay*
    seconds or as soon as the previous one failed; the losers are closed. *sources*: the
    source address per family (:mod:`trisocks.server.egress`); none: the kernel's choice.

    A single target (an IP literal, or a name with one address) is connected to directly:
    no nursery and no task, which is most of what a CONNECT costs the server.

    Raises:
        OSError: every attempt failed; like ``trio.open_tcp_stream``, the per-address errors
        are in ``__cause__`` (see :func:`trisocks.server.errors.reply_for`).
    """
    if len(targets) == 1:
        return trio.SocketStream(await _connect(targets[0], (sources or {}).get(targets[0][0])))
    winner: trio.socket.SocketType | None = None
    errors: list[OSError] = []

    async def attempt(target: Target, failed: trio.Event) -> None:
        nonlocal winner
        try:
            sock = await _connect(target, (sources or {}).get(target[0]))
        except OSError as exc:
            errors.append(exc)
            failed.set()
            return
        if winner is None:
            winner = sock
            nursery.cancel_scope.cancel()
        else:
            sock.close()

    async with trio.open_nursery() as nursery:
        for target in targets:
            failed = trio.Event()
            nursery.start_soon(attempt, target, failed)
            with trio.move_on_after(delay):
                await failed.wait()
    if winner is None:
        raise OSError(f"all {len(targets)} connection attempts failed") from ExceptionGroup(
            "connection attempts", errors or [OSError("no address")]
        )
    return trio.SocketStream(winner)


async def dial(
    address: Address,
    judge: Callable[[list[IP]], Decision | None],
    delay: float,
    egress: Callable[[list[socket.AddressFamily]], Sources | None] | None = None,
) -> trio.SocketStream:
    """Resolve *address*, let *judge* see every IP (a Decision return is a deny), connect to
    them as the kernel reaches them (:func:`reach`; the rules judge that form too). *egress*,
    called once judged with the targets' families, gives the source per family (``None``:
    the kernel's choice for all); a family it leaves out is not tried
    (:meth:`trisocks.server.egress.Egress.sources`).

    Raises:
        Denied: an address is denied.
        OSError: resolving or connecting failed (``NoEgress``: no source of any family).
    """
    targets = await resolve(address)
    denial = judge([ip_of(t[1][0]) for t in targets])
    if denial is not None:
        raise Denied(denial)
    reached = list(dict.fromkeys(reach(t) for t in targets))
    sources = None if egress is None else egress([t[0] for t in reached])
    if sources is None:
        return await connect_any(reached, delay)
    return await connect_any([t for t in reached if t[0] in sources], delay, sources)


@attrs.define
class NameCache:
    """Domain targets resolved with ``getaddrinfo`` and kept ``ttl`` seconds (the system
    resolver does not tell us the real TTL). Holds at most ``size`` names, oldest out first.
    With ``resolvers`` configured the server's resolver keeps each answer for its real TTL,
    so nothing is kept here (:attr:`trisocks.server.resolver.Resolver.keeps_ttls`)."""

    ttl: float = 60.0
    size: int = 256
    _entries: dict[str, tuple[float, Any]] = attrs.Factory(dict)

    async def resolve(self, host: str, port: int) -> tuple[socket.AddressFamily, Any]:
        """The family and socket address to send to for *host*:*port* (the first address the
        system prefers).

        Raises:
            OSError: the name does not resolve (``socket.gaierror``).
        """
        if resolver.current().keeps_ttls:
            infos = await lookup(host, 0, socket.SOCK_DGRAM)
            family, _type, _proto, _name, sockaddr = infos[0]
            return family, (sockaddr[0], port, *sockaddr[2:])
        now = trio.current_time()
        cached = self._entries.get(host)
        if cached is None or cached[0] <= now:
            infos = await lookup(host, 0, socket.SOCK_DGRAM)
            family, _type, _proto, _name, sockaddr = infos[0]
            self._entries.pop(host, None)
            if len(self._entries) >= self.size:
                del self._entries[next(iter(self._entries))]
            cached = self._entries[host] = (now + self.ttl, (family, sockaddr))
        family, sockaddr = cached[1]
        return family, (sockaddr[0], port, *sockaddr[2:])
