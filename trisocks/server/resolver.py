"""Names to addresses for one server: the ``hosts`` table, then DNS servers of the config's
own (``resolvers``) or, without them, the system resolver (``getaddrinfo``) as before.

With ``resolvers`` set, A and AAAA are asked at once of those servers (dnspython on trio: UDP,
and TCP again when a UDP answer comes back truncated), and the answer is kept as long as its
TTL says (at most :data:`TTL_MAX`). A name that does not exist (NXDOMAIN) or has no address
(NODATA) is kept too, for its negative TTL (RFC 2308: the SOA's, at most
:data:`NEGATIVE_TTL_MAX`; dnspython's short default without an SOA). ``resolver_timeout``
bounds each lookup, asked or cached. Every failure is a :class:`socket.gaierror`, as
``getaddrinfo`` raises, so the replies stay the ones the system resolver gave (REP 04).

Which resolver a lookup uses is the server's: :func:`trisocks.server.serve.serve` puts its
:class:`Resolver` in :data:`CURRENT` (a context variable, so every task of that server sees it
and two servers in one process keep their own), and a reload reconfigures that same object;
:func:`trisocks.server.dial.lookup` reads it (:func:`current`). Outside a server, lookups go
to a resolver with no table that asks the system.
"""

from __future__ import annotations

import contextvars
import ipaddress
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.reversename
import trio

from trisocks.policy.addresses import numeric_host

if TYPE_CHECKING:
    from trisocks.config import Config

__all__ = ["CURRENT", "NEGATIVE_TTL_MAX", "TTL_MAX", "Resolver", "current", "host_key"]

TTL_MAX = 86400.0
"""The longest an answer is kept, whatever its TTL."""
NEGATIVE_TTL_MAX = 300.0
"""The longest "no such name" or "no address" is kept: a name created meanwhile is reached
this long after, at most."""
EDNS_PAYLOAD = 1232
"""The UDP answer size offered (EDNS0; DNS flag day 2020); a larger answer comes back
truncated and is asked again over TCP."""

_NODATA = getattr(socket, "EAI_NODATA", socket.EAI_NONAME)
_MESSAGES = {
    socket.EAI_NONAME: "no such name (NXDOMAIN)",
    _NODATA: "the name has no address",
    socket.EAI_AGAIN: "no DNS server answered",
}

Result = tuple[str, ...] | int
"""Addresses (text, in the order they are tried), or the ``EAI_*`` code a lookup fails with."""


def host_key(name: str | bytes) -> bytes:
    """*name* as the table and the cache know it: lower case, no trailing dot (an IDNA name
    as its ``xn--`` form: the caller encodes it, :func:`trisocks.server.dial.lookup`)."""
    raw = name.encode("idna") if isinstance(name, str) else name
    return raw.lower().rstrip(b".")


class Resolver:
    """The server's resolver (see the module): :meth:`getaddrinfo` answers as
    ``getaddrinfo`` does; :meth:`configure` takes a new config (reload)."""

    def __init__(self, config: Config | None = None) -> None:
        self._hosts: dict[bytes, tuple[str, ...]] = {}
        self._servers: tuple[tuple[str, int], ...] = ()
        self._dns: dns.asyncresolver.Resolver | None = None
        self._timeout = 5.0
        self._cache: OrderedDict[bytes, tuple[float, Result]] = OrderedDict()
        self._cache_size: int | None = 10000
        self.queries = 0
        """DNS questions sent (A and AAAA count one each; a TCP retry is the same one)."""
        if config is not None:
            self.configure(config)

    @property
    def keeps_ttls(self) -> bool:
        """Answers are cached here as long as their TTL says (DNS servers are configured): a
        caller needs no cache of its own, which would outlive short TTLs."""
        return bool(self._servers) and self._cache_size != 0

    @property
    def servers(self) -> tuple[tuple[str, int], ...]:
        """The DNS servers asked, as (IP, port); empty: the system resolver."""
        return self._servers

    def configure(self, config: Config) -> None:
        """Apply *config*'s ``resolvers``, ``resolver_timeout``, ``resolver_cache_size`` and
        ``hosts`` to the lookups that start from now on; other servers empty the cache."""
        self._hosts = {host_key(name): ips for name, ips in config.hosts}
        self._timeout = config.resolver_timeout
        self._cache_size = config.resolver_cache_size
        servers = tuple((e.host, e.port) for e in config.resolvers)
        if servers != self._servers:
            self._servers = servers
            self._cache.clear()
            self._dns = _dns_resolver(servers, self._timeout) if servers else None
        elif self._dns is not None:
            self._dns.timeout = min(2.0, self._timeout)
        self._trim()

    async def getaddrinfo(self, name: bytes, port: int | None, type: int) -> list[Any]:
        """``getaddrinfo(name, port, type=type)``: ``(family, type, proto, canonname,
        sockaddr)`` tuples; *name* is the encoded DST.ADDR.

        Raises:
            socket.gaierror: the name does not resolve, or no server answered in time.
        """
        ips = self._hosts.get(host_key(name))
        if ips is None:
            if self._dns is None:
                return await trio.socket.getaddrinfo(name, port, type=type)
            ips = await self._addresses(name)
        return _infos(ips, port or 0, type)

    async def reverse(self, ip: str) -> str:
        """The name of *ip* (Tor's RESOLVE_PTR): from ``hosts`` first (the first name that
        lists it), then a PTR query at ``resolvers`` (cached for its TTL), else the system's
        ``getnameinfo``.

        Raises:
            socket.gaierror: no name, or no server answered in time.
        """
        for name, ips in self._hosts.items():
            if ip in ips:
                return name.decode("ascii")
        if self._dns is None:
            host, _ = await trio.socket.getnameinfo((ip, 0), socket.NI_NAMEREQD)
            return str(host)
        key = b"\x00ptr " + ip.encode()  # no name can spell this: a key of its own

        async def ask() -> tuple[Result, float]:
            with trio.move_on_after(self._timeout):
                return await self._ptr(ip)
            return socket.EAI_AGAIN, 0.0

        result = await self._cached(key, ask)
        if isinstance(result, int):
            raise socket.gaierror(result, f"{ip}: {_MESSAGES[result]}")
        return result[0]

    async def _ptr(self, ip: str) -> tuple[Result, float]:
        assert self._dns is not None
        self.queries += 1
        try:
            answer = await self._dns.resolve(dns.reversename.from_address(ip), "PTR",
                                             raise_on_no_answer=False, search=False,
                                             lifetime=self._timeout,
                                             backend=dns.asyncbackend.get_backend("trio"))
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.responses()  # type: ignore[no-untyped-call]
            return socket.EAI_NONAME, _negative_ttl(next(iter(responses.values()), None))
        except dns.exception.DNSException:
            return socket.EAI_AGAIN, 0.0
        ttl = float(answer.chaining_result.minimum_ttl)
        if answer.rrset is None:
            return socket.EAI_NONAME, min(ttl, NEGATIVE_TTL_MAX)
        name = answer.rrset[0].target.to_text(omit_final_dot=True)
        return (name,), min(ttl, TTL_MAX)

    async def _addresses(self, name: bytes) -> tuple[str, ...]:
        key = host_key(name)
        number = numeric_host(key.decode("ascii", "replace"))
        if number is not None:  # as getaddrinfo would: a number is its address
            return (str(number),)
        result = await self._cached(key, lambda: self._ask(key))
        if isinstance(result, int):
            raise socket.gaierror(result, f"{key.decode('ascii', 'replace')}: {_MESSAGES[result]}")
        return result

    async def _ask(self, key: bytes) -> tuple[Result, float]:
        """The answer for *key* and how long it may be kept (0: not at all)."""
        try:
            qname = dns.name.Name([*key.split(b"."), b""])
        except dns.exception.DNSException:  # an empty label, or too long for DNS
            return socket.EAI_NONAME, 0.0
        parts: dict[int, tuple[Result, float]] = {}

        async def ask(rdtype: dns.rdatatype.RdataType) -> None:
            parts[rdtype] = await self._one(qname, rdtype)

        with trio.move_on_after(self._timeout):  # dnspython's own clock is the wall's
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask, dns.rdatatype.AAAA)
                nursery.start_soon(ask, dns.rdatatype.A)
        return _combine(parts.get(dns.rdatatype.AAAA), parts.get(dns.rdatatype.A))

    async def _one(self, qname: dns.name.Name, rdtype: dns.rdatatype.RdataType
                   ) -> tuple[Result, float]:
        assert self._dns is not None
        self.queries += 1
        try:
            answer = await self._dns.resolve(qname, rdtype, raise_on_no_answer=False,
                                             search=False, lifetime=self._timeout,
                                             backend=dns.asyncbackend.get_backend("trio"))
        except dns.resolver.NXDOMAIN as exc:
            responses = exc.responses()  # type: ignore[no-untyped-call]
            response = next(iter(responses.values()), None)
            return socket.EAI_NONAME, _negative_ttl(response)
        except dns.exception.DNSException:  # timeout, SERVFAIL from all, malformed answers
            return socket.EAI_AGAIN, 0.0
        ttl = float(answer.chaining_result.minimum_ttl)
        if answer.rrset is None:
            return _NODATA, min(ttl, NEGATIVE_TTL_MAX)
        return tuple(str(rdata.address) for rdata in answer.rrset), min(ttl, TTL_MAX)

    async def _cached(
        self, key: bytes, ask: Callable[[], Awaitable[tuple[Result, float]]]
    ) -> Result:
        """The cached answer for *key* while fresh, else *ask*'s (kept for its TTL)."""
        cached = self._cache.get(key)
        if cached is not None and cached[0] > trio.current_time():
            self._cache.move_to_end(key)
            return cached[1]
        result, ttl = await ask()
        if ttl > 0 and self._cache_size:
            self._cache[key] = (trio.current_time() + ttl, result)
            self._cache.move_to_end(key)
            self._trim()
        return result

    def _trim(self) -> None:
        limit = self._cache_size or 0
        while len(self._cache) > limit:
            self._cache.popitem(last=False)


def _dns_resolver(servers: tuple[tuple[str, int], ...], timeout: float
                  ) -> dns.asyncresolver.Resolver:
    resolver = dns.asyncresolver.Resolver(configure=False)  # not /etc/resolv.conf
    resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in servers]
    resolver.timeout = min(2.0, timeout)  # per server and attempt; the lookup's is ours
    resolver.use_edns(0, 0, EDNS_PAYLOAD)
    resolver.cache = None  # ours keeps negative answers too, and is bounded by count
    return resolver


def _negative_ttl(response: dns.message.Message | None) -> float:
    if not isinstance(response, dns.message.QueryMessage):
        return float(dns.message.NEGATIVE_TTL_WITHOUT_SOA)
    try:
        return min(float(response.resolve_chaining().minimum_ttl), NEGATIVE_TTL_MAX)
    except dns.exception.DNSException:
        return float(dns.message.NEGATIVE_TTL_WITHOUT_SOA)


def _combine(v6: tuple[Result, float] | None, v4: tuple[Result, float] | None
             ) -> tuple[Result, float]:
    """One result for the name from its AAAA and A parts (``None``: not answered in time).

    Addresses of either family make the result (kept for the shorter TTL of the parts that
    answered); else NXDOMAIN, if either said so; else "no server answered", if one did not
    (not kept); else "no address"."""
    parts = [p for p in (v6, v4) if p is not None]
    ips6 = v6[0] if v6 is not None and not isinstance(v6[0], int) else ()
    ips4 = v4[0] if v4 is not None and not isinstance(v4[0], int) else ()
    answered = [ttl for result, ttl in parts if result != socket.EAI_AGAIN]
    if ips6 or ips4:
        first, second = (ips6, ips4) if ips6 and _routed(ips6[0]) else (ips4, ips6)
        return (*first, *second), min(answered)
    for result, ttl in parts:
        if result == socket.EAI_NONAME:
            return result, ttl
    if len(answered) < 2:
        return socket.EAI_AGAIN, 0.0
    return _NODATA, min(answered)


def _routed(ip: str) -> bool:
    """This host has a route to IPv6 address *ip* (then IPv6 goes first, RFC 6724 rule 1,
    found as glibc finds it: a UDP socket connected there, which sends nothing)."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.connect((ip, 9))
    except OSError:
        return False
    return True


def _infos(ips: tuple[str, ...], port: int, type: int) -> list[Any]:
    proto = {socket.SOCK_STREAM: socket.IPPROTO_TCP, socket.SOCK_DGRAM: socket.IPPROTO_UDP}
    kind = socket.SocketKind(type) if type else socket.SOCK_STREAM
    infos: list[Any] = []
    for text in ips:
        ip = ipaddress.ip_address(text)
        if ip.version == 6:
            infos.append((socket.AF_INET6, kind, proto.get(kind, 0), "", (text, port, 0, 0)))
        else:
            infos.append((socket.AF_INET, kind, proto.get(kind, 0), "", (text, port)))
    return infos


CURRENT: contextvars.ContextVar[Resolver | None] = contextvars.ContextVar(
    "trisocks_resolver", default=None
)
"""The resolver of the server this task belongs to (see the module); ``None`` outside one."""
_SYSTEM = Resolver()


def current() -> Resolver:
    """The resolver of the server this task belongs to; outside one, the system's."""
    return CURRENT.get() or _SYSTEM
