"""UDP ASSOCIATE (RFC 1928 §7): a datagram relay that lives as long as its TCP connection.

Rules an association keeps:

1. Datagrams reach the relay socket only from the client's IP (the control connection's
   peer), and only from one port: DST.PORT when the request names it, otherwise the port of the
   first well-formed datagram. Everything else is dropped silently (counted in
   ``stats.udp_dropped``).
2. Towards targets, one outbound socket, made on first use: dual-stack (``AF_INET6`` with
   ``IPV6_V6ONLY`` off; IPv4 targets are sent to as ``::ffff:a.b.c.d`` and such sources are
   named as IPv4 again), so an association holds at most two UDP ports, this one and the one
   facing the client (``Reservations.reserve`` counts them against ``udp_sockets``). A datagram
   from a target comes back to the client only if the client has sent to that exact IP and
   port; its header names that source.
3. FRAG ≠ 0 goes through one :class:`Reassembler`, whose timer runs on trio's clock: the queue
   is dropped at its deadline even if no datagram arrives (:class:`FragmentQueue`).
4. The association ends when the control connection ends (EOF or error; bytes on it are
   discarded), when the session is killed, or after ``udp_idle_timeout`` without a relayed
   datagram (dropped ones do not keep it alive). Every socket is closed by a ``with`` block.
"""

from __future__ import annotations

import contextlib
import functools
import math
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import attrs
import trio

from trisocks.gss.stream import GssStream
from trisocks.net import ip_of
from trisocks.policy.routes import Route
from trisocks.protocol import (
    Address,
    AddressType,
    Reassembler,
    Reply,
    Request,
    SocksError,
    UdpHeader,
    encode_udp_header,
    parse_udp_header,
)
from trisocks.server.context import ServerContext, Stats
from trisocks.server.control import (
    ClientStream,
    announced_address,
    open_local_socket,
    watch_control,
)
from trisocks.server.dial import NameCache, literal, reach
from trisocks.server.egress import has_egress
from trisocks.server.errors import reply_for
from trisocks.server.replies import send_reply
from trisocks.sessions import Session

__all__ = ["FragmentQueue", "handle_udp_associate", "serve_association"]

T = TypeVar("T")

MAX_DATAGRAM = 65536
"""Receive buffer: larger than any UDP payload, so nothing is ever truncated."""
MAX_TARGETS = 1024
"""Targets remembered per association for rule 2; the oldest is forgotten beyond this."""

Endpoint = tuple[Any, int]
"""An IP (as :func:`ip_of` gives it) and a port: what rule 2 compares."""


async def handle_udp_associate(
    stream: ClientStream,
    session: Session,
    request: Request,
    leftover: bytes,
    ctx: ServerContext,
) -> None:
    """Serve a UDP ASSOCIATE request: reply with the relay's address, relay until the end."""
    refusal = ctx.reservations.reserve(session, "udp")  # held until the session ends
    if refusal is not None:
        await send_reply(stream, session, refusal)
        return
    await serve_association(stream, session, request, ctx, Association)


async def serve_association(
    stream: ClientStream, session: Session, request: Request, ctx: ServerContext,
    make: Callable[..., Association],
) -> None:
    """Open the relay socket beside the control connection, reply with its address, and run
    the association *make* builds (``make(ctx, session, relay_socket, client, gss)``: direct,
    or through a parent) until the end."""
    try:
        relay_socket = await open_local_socket(stream, socket.SOCK_DGRAM)
    except OSError as exc:
        session.close_reason = f"udp bind failed: {exc}"
        await send_reply(stream, session, reply_for(exc))
        return
    with relay_socket:
        # The session's client, not the socket's peer: behind a PROXY protocol balancer the
        # datagrams come from the real client, which only the header named.
        client = ClientFilter(session.client_ip, request.address.port or None)
        gss = stream if isinstance(stream, GssStream) else None
        association = make(ctx, session, relay_socket, client, gss)
        bound = announced_address(ctx, relay_socket.getsockname())
        await send_reply(stream, session, Reply.SUCCEEDED, bound)
        ctx.registry.set_state(session, "relaying")
        await association.run(stream)


@attrs.define
class ClientFilter:
    """Rule 1. Invariant: ``ip`` never changes; ``port`` changes at most once, from None."""

    ip: Any
    port: int | None
    reply_to: Any = None
    """Where datagrams for the client go: the source of its first accepted datagram."""

    def admits(self, sockaddr: Any) -> bool:
        return ip_of(sockaddr[0]) == self.ip and self.port in (None, sockaddr[1])

    def fix(self, sockaddr: Any) -> None:
        """Pin the client's port (if the request left it open) to this datagram's source."""
        self.port = sockaddr[1]
        if self.reply_to is None:
            self.reply_to = sockaddr


@attrs.define
class FragmentQueue:
    """The association's reassembly queue on trio time, with its stats (rule 3)."""

    reassembler: Reassembler
    stats: Stats

    def feed(self, header: UdpHeader, data: bytes) -> tuple[Address, bytes] | None:
        """Take one datagram's DATA; return what is ready to send, if anything.

        Fragments the reassembler gives up (reset, gap, over a bound) are counted as
        ``udp_dropped["fragment"]``: whatever went in and neither stays queued nor comes out."""
        is_fragment = header.position != 0
        queued_before = self.reassembler.pending
        ready = self.reassembler.feed(header, data, trio.current_time())
        reassembled = ready is not None and is_fragment
        # A completed sequence holds exactly ``position`` fragments (Reassembler rule 3).
        delivered = header.position if reassembled else 0
        lost = queued_before + is_fragment - self.reassembler.pending - delivered
        self.stats.udp_dropped["fragment"] += lost
        self.stats.reassembled += reassembled
        return ready

    async def wait(self, receive: Callable[[], Awaitable[T]]) -> T:
        """Await ``receive()``; whenever the reassembly timer runs out first, drop the queue
        (RFC 1928 §7) and go on waiting. So a half-sent sequence never outlives its timer."""
        while True:
            deadline = self.reassembler.deadline
            with trio.move_on_at(math.inf if deadline is None else deadline):
                return await receive()
            pending = self.reassembler.pending
            if self.reassembler.expire(trio.current_time()):
                self.stats.udp_dropped["fragment"] += pending


def sockaddr_for(address: Address) -> tuple[socket.AddressFamily, Any]:
    """The family and socket address of an IP literal Address."""
    if ":" in address.host:
        return socket.AF_INET6, (address.host, address.port, 0, 0)
    return socket.AF_INET, (address.host, address.port)


async def _bound_udp_socket(family: socket.AddressFamily) -> trio.socket.SocketType:
    """A UDP socket on every address, port 0; for ``AF_INET6`` dual-stack (IPv4 too).

    Raises:
        OSError: the socket cannot be made, made dual-stack or bound (then it is closed).
    """
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        await sock.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", 0))
    except BaseException:
        sock.close()
        raise
    return sock


@attrs.define(eq=False)
class Association:
    """One UDP association: its sockets, filters, queue and name cache."""

    ctx: ServerContext
    session: Session
    relay_socket: trio.socket.SocketType
    client: ClientFilter
    gss: GssStream | None = None
    """After GSSAPI, each datagram travels as one wrapped frame (RFC 1961 §5)."""
    fragments: FragmentQueue = attrs.field(init=False)
    names: NameCache = attrs.Factory(NameCache)
    _targets: dict[Endpoint, None] = attrs.Factory(dict)
    """Rule 2's memory, oldest first (a dict keeps insertion order)."""
    _outbound: trio.socket.SocketType | None = None
    _by_family: dict[socket.AddressFamily, trio.socket.SocketType] = attrs.Factory(dict)
    """With ``egress``: one outbound socket per family, each bound to its source."""
    _idle: trio.CancelScope = attrs.Factory(trio.CancelScope)
    _allowed: Callable[[str | None, Any, int], bool] = attrs.field(init=False)
    """The access rules, per datagram target (:meth:`Judge.datagram_check`)."""

    def __attrs_post_init__(self) -> None:
        reassembler = Reassembler(timeout=self.ctx.config.udp_reassembly_timeout)
        self.fragments = FragmentQueue(reassembler, self.ctx.stats)
        self._allowed = self.ctx.judge.datagram_check(self.session)

    async def run(self, control: ClientStream) -> None:
        """Relay until rule 4 ends the association."""
        with contextlib.ExitStack() as sockets, self._idle:
            self._touch()
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    await watch_control(control)
                    self.session.close_reason = "control connection closed"
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                receive = functools.partial(self._from_client, nursery, sockets)
                nursery.start_soon(self._until_failure, nursery, receive)
        if self._idle.cancelled_caught:
            self.session.close_reason = "udp idle timeout"

    async def _until_failure(
        self, nursery: trio.Nursery, loop: Callable[[], Awaitable[None]]
    ) -> None:
        """Run a receive loop; a socket error ends the association (never the server: an
        exception escaping the nursery would reach the accept loop wrapped in a group)."""
        try:
            await loop()
        except OSError as exc:
            self.session.close_reason = f"udp relay: {exc}"
            nursery.cancel_scope.cancel()

    def _touch(self) -> None:
        self._idle.deadline = trio.current_time() + self.ctx.config.udp_idle_timeout

    def _drop(self, reason: str) -> None:
        self.ctx.stats.udp_dropped[reason] += 1

    async def _from_client(self, nursery: trio.Nursery, sockets: contextlib.ExitStack) -> None:
        while True:
            datagram, source = await self.fragments.wait(
                lambda: self.relay_socket.recvfrom(MAX_DATAGRAM)
            )
            ready = self._accept_from_client(datagram, source)
            if ready is not None:
                await self._send_to_target(*ready, nursery, sockets)

    def _accept_from_client(self, datagram: bytes, source: Any) -> tuple[Address, bytes] | None:
        """Rule 1, the header and reassembly: what to send on, if anything."""
        if not self.client.admits(source):
            self._drop("foreign_source")
            return None
        try:
            if self.gss is not None:
                datagram = self.gss.unwrap_datagram(datagram)
            header = parse_udp_header(datagram)
        except SocksError:
            self._drop("malformed")
            return None
        self.client.fix(source)
        return self.fragments.feed(header, datagram[header.offset :])

    async def _send_to_target(
        self, address: Address, data: bytes, nursery: trio.Nursery, sockets: contextlib.ExitStack
    ) -> None:
        address = literal(address)  # a numeric name is its address, never looked up
        try:
            if address.atyp == AddressType.DOMAIN:
                with trio.fail_after(self.ctx.config.connect_timeout):
                    family, sockaddr = await self.names.resolve(address.host, address.port)
            else:
                family, sockaddr = sockaddr_for(address)
        except (OSError, trio.TooSlowError):
            self._drop("unreachable")
            return
        # The target may change with every datagram, so each is judged (decisions are cached).
        host = address.host if address.atyp == AddressType.DOMAIN else None
        if not self._allowed(host, ip_of(sockaddr[0]), address.port):
            self._drop("not_allowed")
            return
        family, sockaddr = reach((family, sockaddr))  # the form judged too: 0.0.0.0 is 127.0.0.1
        try:
            outbound = await self._outbound_socket(nursery, sockets, family)
            if outbound.family == socket.AF_INET6 and family == socket.AF_INET:
                sockaddr = ("::ffff:" + sockaddr[0], sockaddr[1], 0, 0)
            await outbound.sendto(data, sockaddr)
        except OSError:
            self._drop("unreachable")
            return
        self._remember(sockaddr)
        self._touch()
        self.session.counters.bytes_up += len(data)
        self.session.counters.datagrams_up += 1

    def _remember(self, sockaddr: Any) -> None:
        key = (ip_of(sockaddr[0]), sockaddr[1])
        self._targets.pop(key, None)
        if len(self._targets) >= MAX_TARGETS:
            del self._targets[next(iter(self._targets))]
        self._targets[key] = None

    async def _outbound_socket(
        self, nursery: trio.Nursery, sockets: contextlib.ExitStack, family: socket.AddressFamily
    ) -> trio.socket.SocketType:
        """The outbound socket, made (and its receive task started) on first use: dual-stack,
        or IPv4 only on a host without IPv6 (then IPv6 targets are unreachable). When the
        session's rule gives ``egress``, one socket per *family* instead, bound to that
        family's source (:meth:`trisocks.server.egress.Egress.source`, kept for the
        association).

        Raises:
            OSError: no socket could be made or bound (``NoEgress``: no source of *family*).
        """
        route = self.ctx.judge.route_of(self.session)
        if has_egress(route):
            return await self._egress_socket(nursery, sockets, family, route)
        outbound = self._outbound
        if outbound is None:
            try:
                outbound = await _bound_udp_socket(socket.AF_INET6)
            except OSError:  # no IPv6 on this host
                outbound = await _bound_udp_socket(socket.AF_INET)
            sockets.enter_context(outbound)  # no checkpoint since it was made
            self._outbound = outbound
            receive = functools.partial(self._from_targets, outbound)
            nursery.start_soon(self._until_failure, nursery, receive)
        return outbound

    async def _egress_socket(
        self, nursery: trio.Nursery, sockets: contextlib.ExitStack,
        family: socket.AddressFamily, route: Route | None,
    ) -> trio.socket.SocketType:
        """The outbound socket of *family* bound to the rule's source for it."""
        outbound = self._by_family.get(family)
        if outbound is None:
            outbound = await self.ctx.egress.udp_socket(self.session, route, family)
            sockets.enter_context(outbound)  # no checkpoint since it was made
            self._by_family[family] = outbound
            receive = functools.partial(self._from_targets, outbound)
            nursery.start_soon(self._until_failure, nursery, receive)
        return outbound

    async def _from_targets(self, outbound: trio.socket.SocketType) -> None:
        while True:
            data, source = await outbound.recvfrom(MAX_DATAGRAM)
            ip = ip_of(source[0])  # an IPv4-mapped source is IPv4 again
            if (ip, source[1]) not in self._targets:
                self._drop("foreign_source")
                continue
            packet = encode_udp_header(Address.of(str(ip), source[1])) + data
            try:
                if self.gss is not None:
                    packet = self.gss.wrap_datagram(packet)
                await self.relay_socket.sendto(packet, self.client.reply_to)
            except OSError:
                self._drop("unreachable")
                continue
            self._touch()
            self.session.counters.bytes_down += len(data)
            self.session.counters.datagrams_down += 1
