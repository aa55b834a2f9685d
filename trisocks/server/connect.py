"""CONNECT (RFC 1928 §4): open the outbound connection (to addresses the rules saw), reply,
relay."""

from __future__ import annotations

import socket
from collections.abc import Iterable

import trio

from trisocks.client import SocksStream
from trisocks.net import address_of, peer_address, socket_of
from trisocks.policy.routes import Parent
from trisocks.policy.rules import IP, Decision
from trisocks.protocol import Address, Reply, Request
from trisocks.server.context import ServerContext
from trisocks.server.control import ClientStream
from trisocks.server.dial import Denied, Sources, dial
from trisocks.server.egress import has_egress
from trisocks.server.errors import reply_for
from trisocks.server.parents import Rerouted, dial_via
from trisocks.server.relay import relay_session
from trisocks.server.replies import send_reply
from trisocks.sessions import Session

__all__ = ["dial_target", "handle_connect"]

HAPPY_EYEBALLS_DELAY = 0.25


async def dial_target(
    session: Session, ctx: ServerContext, target: Address
) -> trio.SocketStream | SocksStream:
    """Connect *session* to *target*, judging every address a name resolves to, within the
    connect timeout (SOCKS and HTTP CONNECT, and HTTP forwarding, alike). A route with
    ``via`` connects through its parents (:mod:`trisocks.server.parents`; a name whose rule
    hangs on its addresses is resolved and judged here first): the stream is then the
    connection to the parent.

    Raises:
        Denied: a resolved address is denied by the rules.
        OSError: refused, unreachable, no such name; through parents also
            :class:`~trisocks.server.errors.UpstreamReply` (the parent's answer).
        trio.TooSlowError: the connect timeout passed.
    """
    ctx.registry.set_state(session, "connecting")
    with trio.fail_after(ctx.config.connect_timeout):
        if _via(session, ctx):
            return await _through_parents(session, ctx, target, None)
        try:
            upstream = await dial(
                target, lambda ips: _judged(session, ctx, ips), HAPPY_EYEBALLS_DELAY,
                lambda families: ctx.egress.sources(session, ctx.judge.route_of(session),
                                                    families),
            )
        except Rerouted as exc:
            return await _through_parents(session, ctx, target, exc.ips)
    ctx.egress.connected(session, ctx.judge.route_of(session), upstream.socket)
    return upstream


def _via(session: Session, ctx: ServerContext) -> tuple[Parent, ...]:
    route = ctx.judge.route_of(session)
    return () if route is None else route.via


def _judged(session: Session, ctx: ServerContext, ips: list[IP]) -> Decision | None:
    """Judge a name's addresses; allowed by a rule that routes through parents: Rerouted."""
    denial = ctx.judge.deny_resolved(session, ips)
    if denial is None and _via(session, ctx):
        raise Rerouted(ips)
    return denial


async def _through_parents(
    session: Session, ctx: ServerContext, target: Address, ips: list[IP] | None
) -> trio.SocketStream | SocksStream:
    config, route = ctx.config, ctx.judge.route_of(session)
    sources_for = None
    if has_egress(route):  # the connection to the parent leaves from the egress address

        def sources_for(families: Iterable[socket.AddressFamily]) -> Sources | None:
            return ctx.egress.sources(session, route, families)

    upstream = await dial_via(
        session, _via(session, ctx), target, lambda found: ctx.judge.deny_resolved(session, found),
        ctx.stats, config.via_timeout, config.via_down_for, ips, sources_for,
    )
    ctx.egress.connected(session, route, socket_of(upstream))
    return upstream


async def handle_connect(
    stream: ClientStream,
    session: Session,
    request: Request,
    leftover: bytes,
    ctx: ServerContext,
) -> None:
    try:
        upstream = await dial_target(session, ctx, request.address)
    except Denied as exc:
        session.close_reason = str(exc)
        await send_reply(stream, session, Reply.NOT_ALLOWED)
        return
    except (OSError, trio.TooSlowError) as exc:
        session.close_reason = f"connect failed: {exc}"
        await send_reply(stream, session, reply_for(exc))
        return
    try:
        if session.parent is None:  # through a parent, dial_via knows (or not) the address
            session.resolved = peer_address(upstream.socket.getpeername())
        await send_reply(
            stream, session, Reply.SUCCEEDED, address_of(upstream.socket.getsockname())
        )
        await relay_session(stream, upstream, leftover, session, ctx)
    finally:
        upstream.socket.close()  # synchronous: an async close would cost a checkpoint
