"""UDP ASSOCIATE and BIND through a rule's ``via`` parents (SOCKS5 ones: an HTTP parent has
neither, and is passed over).

Which parent: the first of the list, skipping those marked down
(:func:`trisocks.server.parents.pick_order`), that is reached and negotiated within
``via_timeout`` (one that is not is marked down, as for CONNECT) and answers the request with
success. A parent that answers it with a failure (REP 07: microsocks has no UDP, say) is
passed over without being marked down (it serves CONNECT still); when no parent accepts, the
client gets the last parent's REP, or REP 01.

- **UDP**: the association's outbound traffic goes through one parent association
  (:func:`trisocks.client.open_socks_udp`). The client side is the direct relay's
  (:class:`trisocks.server.udp.Association`: the client filter, reassembly, the rules per
  datagram); names are resolved here and judged, and the parent gets the judged address (for
  ``socks5h`` too: what is judged is what is sent to). Replies come back from the parent's
  relay with its header, and reach the client only from targets it sent to. The association
  ends as a direct one does; the parent's association ends with it.
- **BIND**: the parent listens; its first reply's address is what the client is told, its
  second names the peer that connected to it; then the client is relayed to the parent's
  stream. DST.ADDR goes to the parent as the client gave it (a domain is resolved here first,
  and its addresses judged, as for a direct BIND). The wait for the peer ends after
  ``bind_timeout`` (REP 06) or when the client closes the control connection.
"""

from __future__ import annotations

import contextlib
import functools
import socket
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any, cast

import trio

from trisocks.client import (
    SocksAuthError,
    SocksDatagramSocket,
    SocksProtocolError,
    SocksReplyError,
    open_socks_udp,
)
from trisocks.client.handshake import Connect, Control, connect_control
from trisocks.net import ip_of
from trisocks.policy.routes import Parent
from trisocks.protocol import Address, AddressType, Command, Reply, Request
from trisocks.server.bind import handle_bind
from trisocks.server.context import ServerContext
from trisocks.server.control import (
    ClientStream,
    unless_closed,
)
from trisocks.server.dial import Sources, literal, lookup
from trisocks.server.egress import has_egress
from trisocks.server.errors import reply_for
from trisocks.server.parents import (
    ParentFailed,
    pick_order,
    plain,
    reach_parent,
    read_password,
)
from trisocks.server.relay import relay_session
from trisocks.server.replies import send_reply
from trisocks.server.udp import Association, handle_udp_associate, serve_association
from trisocks.sessions import Session

__all__ = ["ParentRelay", "handle_bind_routed", "handle_udp_routed"]

Handler = Callable[[ClientStream, Session, Request, bytes, ServerContext], Any]
_CONNECT_FAILURES = (OSError, trio.BrokenResourceError, trio.TooSlowError, SocksAuthError,
                     SocksProtocolError, ParentFailed)


def _socks_parents(session: Session, ctx: ServerContext) -> list[Parent]:
    route = ctx.judge.route_of(session)
    if route is None:
        return []
    order = pick_order(route.via, ctx.stats, trio.current_time())
    return [p for p in order if p.scheme != "http"]


def _from_egress(session: Session, ctx: ServerContext, parent: Parent) -> Connect:
    """How to reach *parent*: by the server's resolver, from the rule's egress address when it
    has one (which becomes ``Session.egress``)."""
    route = ctx.judge.route_of(session)

    def sources_for(families: Iterable[socket.AddressFamily]) -> Sources | None:
        return ctx.egress.sources(session, route, families)

    async def connect() -> trio.SocketStream:
        stream = await reach_parent(parent, sources_for if has_egress(route) else None)
        ctx.egress.connected(session, route, stream.socket)
        return stream

    return connect


def _auth(parent: Parent) -> tuple[str, str] | None:
    return None if parent.user is None else (parent.user, read_password(parent) or "")


def _failed(ctx: ServerContext, parent: Parent) -> None:
    ctx.stats.parent_failures[parent.label] += 1
    ctx.stats.parents_down[parent.label] = trio.current_time() + ctx.config.via_down_for


def _used(ctx: ServerContext, session: Session, parent: Parent) -> None:
    ctx.stats.parents_down.pop(parent.label, None)
    ctx.stats.parent_sessions[parent.label] += 1
    session.parent = parent.label


# --- UDP ASSOCIATE --------------------------------------------------------------------------


class ParentRelay:
    """The parent association, looking to :class:`Association` like its outbound socket:
    ``sendto`` sends a datagram to the parent with the SOCKS UDP header naming the target,
    ``recvfrom`` gives a reply's payload and its source as the parent names it."""

    family = socket.AF_INET
    """Never ``AF_INET6``: the association then sends IPv4 targets as IPv4, not mapped."""

    def __init__(self, sock: SocksDatagramSocket) -> None:
        self._sock = sock

    async def sendto(self, data: bytes, sockaddr: Any) -> None:
        await self._sock.send_to(data, (sockaddr[0], sockaddr[1]))

    async def recvfrom(self, size: int) -> tuple[bytes, tuple[str, int]]:
        while True:
            data, source = await self._sock.receive_from()
            try:
                ip_of(source[0])
            except ValueError:
                continue  # a name as the source: no target we sent to
            return data, source


class ParentAssociation(Association):
    """:class:`Association` whose outbound "socket" is a :class:`ParentRelay`."""

    relay: ParentRelay | None = None

    async def _outbound_socket(
        self, nursery: trio.Nursery, sockets: contextlib.ExitStack, *args: Any
    ) -> trio.socket.SocketType:
        relay = cast(trio.socket.SocketType, self.relay)
        if self._outbound is None:
            self._outbound = relay
            receive = functools.partial(self._from_targets, relay)
            nursery.start_soon(self._until_failure, nursery, receive)
        return relay


@contextlib.asynccontextmanager
async def _parent_udp(
    session: Session, ctx: ServerContext, parents: Sequence[Parent]
) -> AsyncIterator[SocksDatagramSocket | Reply]:
    """The first parent association that works, or the reply for the client."""
    reply = Reply.GENERAL_FAILURE
    for parent in parents:
        async with contextlib.AsyncExitStack() as held:
            try:
                with trio.fail_after(ctx.config.via_timeout):
                    sock = await held.enter_async_context(
                        open_socks_udp((parent.host, parent.port), auth=_auth(parent),
                                       connect=_from_egress(session, ctx, parent)))
            except SocksReplyError as exc:
                reply = Reply(exc.reply) if isinstance(exc.reply, Reply) else reply
                session.close_reason = f"{parent.label}: {exc}"
                continue
            except _CONNECT_FAILURES as exc:
                _failed(ctx, parent)
                session.close_reason = f"{parent.label}: {exc or type(exc).__name__}"
                continue
            _used(ctx, session, parent)
            yield sock
            return
    yield reply


async def handle_udp_routed(
    stream: ClientStream, session: Session, request: Request, leftover: bytes,
    ctx: ServerContext,
) -> None:
    """UDP ASSOCIATE: through the route's parents when it has ``via``, else direct."""
    route = ctx.judge.route_of(session)
    if route is None or not route.via:
        return await handle_udp_associate(stream, session, request, leftover, ctx)
    refusal = ctx.reservations.reserve(session, "udp")
    if refusal is not None:
        await send_reply(stream, session, refusal)
        return
    ctx.registry.set_state(session, "connecting")
    async with _parent_udp(session, ctx, _socks_parents(session, ctx)) as parent:
        if isinstance(parent, Reply):
            await send_reply(stream, session, parent)
            return
        session.close_reason = None

        def make(*args: Any) -> Association:
            association = ParentAssociation(*args)
            association.relay = ParentRelay(parent)
            return association

        await serve_association(stream, session, request, ctx, make)


# --- BIND ------------------------------------------------------------------------------------


async def _parent_bind(
    session: Session, ctx: ServerContext, parents: Sequence[Parent], address: Address
) -> tuple[Control, Address] | Reply:
    """The first parent that listens for us: its control connection and BND address."""
    reply = Reply.GENERAL_FAILURE
    for parent in parents:
        try:
            with trio.fail_after(ctx.config.via_timeout):
                control = await connect_control((parent.host, parent.port), _auth(parent),
                                                _from_egress(session, ctx, parent))
        except _CONNECT_FAILURES as exc:
            _failed(ctx, parent)
            session.close_reason = f"{parent.label}: {exc or type(exc).__name__}"
            continue
        try:
            with trio.fail_after(ctx.config.via_timeout):
                listening = await control.request(Command.BIND, address)
        except SocksReplyError as exc:
            control.stream.socket.close()
            reply = Reply(exc.reply) if isinstance(exc.reply, Reply) else reply
            session.close_reason = f"{parent.label}: {exc}"
            continue
        except BaseException as exc:
            control.stream.socket.close()
            if not isinstance(exc, _CONNECT_FAILURES):
                raise
            _failed(ctx, parent)
            session.close_reason = f"{parent.label}: {exc or type(exc).__name__}"
            continue
        _used(ctx, session, parent)
        return control, listening
    return reply


async def _judged_peer(session: Session, ctx: ServerContext, address: Address) -> Reply | None:
    """A domain DST.ADDR's addresses are judged, as for a direct BIND: REP 02 on a deny."""
    address = literal(address)
    if address.atyp != AddressType.DOMAIN:
        return None
    infos = await lookup(address.host, None, socket.SOCK_STREAM)
    denial = ctx.judge.deny_resolved(session, [ip_of(str(info[4][0])) for info in infos])
    if denial is None:
        return None
    session.close_reason = f"denied by rule {denial.rule_id}"
    return Reply.NOT_ALLOWED


async def _second_reply(
    stream: ClientStream, control: Control, early: bytearray, ctx: ServerContext
) -> Address | None:
    """The parent's second reply (the peer), unless the client closes first (``None``)."""
    return await unless_closed(stream, early, ctx.config.bind_timeout, control.read_reply)


async def handle_bind_routed(
    stream: ClientStream, session: Session, request: Request, leftover: bytes,
    ctx: ServerContext,
) -> None:
    """BIND: through the route's parents when it has ``via``, else direct."""
    route = ctx.judge.route_of(session)
    if route is None or not route.via:
        return await handle_bind(stream, session, request, leftover, ctx)
    refusal = ctx.reservations.reserve(session, "bind")  # max_binds_per_user, as direct
    if refusal is not None:
        await send_reply(stream, session, refusal)
        return
    ctx.registry.set_state(session, "connecting")
    try:
        denied = await _judged_peer(session, ctx, request.address)
    except OSError as exc:
        session.close_reason = f"bind failed: {exc}"
        await send_reply(stream, session, reply_for(exc))
        return
    if denied is not None:
        await send_reply(stream, session, denied)
        return
    got = await _parent_bind(session, ctx, _socks_parents(session, ctx), request.address)
    if isinstance(got, Reply):
        await send_reply(stream, session, got)
        return
    control, listening = got
    session.close_reason = None
    early = bytearray(leftover)
    try:
        await send_reply(stream, session, Reply.SUCCEEDED, listening)
        try:
            peer = await _second_reply(stream, control, early, ctx)
        except (SocksReplyError, trio.TooSlowError) as exc:
            timeout = isinstance(exc, trio.TooSlowError)
            session.close_reason = "bind timeout" if timeout else f"no peer: {exc}"
            rep = exc.reply if isinstance(exc, SocksReplyError) else Reply.TTL_EXPIRED
            await send_reply(stream, session, rep if isinstance(rep, Reply)
                             else Reply.GENERAL_FAILURE)
            return
        except (OSError, SocksProtocolError) as exc:
            session.close_reason = f"no peer: {exc}"
            await send_reply(stream, session, Reply.GENERAL_FAILURE)
            return
        ctx.reservations.release(session)  # the parent's listener is done: a relay now
        if peer is None:
            session.close_reason = "client closed the control connection while waiting"
            return
        session.resolved = peer
        await send_reply(stream, session, Reply.SUCCEEDED, peer)
        upstream = plain(control.stream, bytes(control.buffer), (listening.host, listening.port))
        await relay_session(stream, upstream, bytes(early), session, ctx)
    finally:
        control.stream.socket.close()
