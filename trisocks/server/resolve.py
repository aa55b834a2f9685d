"""Tor's RESOLVE (F0) and RESOLVE_PTR (F1), socks-extensions.txt: one reply, then close.

RESOLVE looks a name up the way CONNECT does (:func:`trisocks.server.dial.resolve`: a numeric
name is its address, the same resolver) and the rules judge every address it got, as they
would before a CONNECT: a name with a denied address is refused (REP 02). The reply carries
one address in BND.ADDR: the first IPv4 one (SOCKS4a can carry nothing else), else the first
IPv6 one. RESOLVE_PTR asks the resolver for the name of an address (judged by the rules as
the request's address) and answers it as a DOMAINNAME (SOCKS5 only).
"""

from __future__ import annotations

import trio

from trisocks.net import ip_of
from trisocks.protocol import Address, AddressType, Command, Reply, Request
from trisocks.server import resolver
from trisocks.server.context import ServerContext
from trisocks.server.control import ClientStream
from trisocks.server.dial import literal, resolve
from trisocks.server.errors import reply_for
from trisocks.server.replies import send_reply
from trisocks.sessions import Session

__all__ = ["handle_resolve"]


async def handle_resolve(
    stream: ClientStream,
    session: Session,
    request: Request,
    leftover: bytes,
    ctx: ServerContext,
) -> None:
    """Answer RESOLVE or RESOLVE_PTR; *leftover* (nothing is meant to follow) is dropped."""
    ctx.registry.set_state(session, "connecting")
    try:
        with trio.fail_after(ctx.config.connect_timeout):
            if request.command == Command.RESOLVE_PTR:
                answer = await _reverse(request.address)
            else:
                answer = await _forward(request.address, session, ctx)
    except (OSError, trio.TooSlowError) as exc:
        session.close_reason = f"resolve failed: {exc or 'timed out'}"
        await send_reply(stream, session, reply_for(exc))
        return
    if isinstance(answer, Reply):
        await send_reply(stream, session, answer)
        return
    session.resolved = answer  # as for CONNECT, port 0: an address, or a name
    await send_reply(stream, session, Reply.SUCCEEDED, answer)


async def _forward(address: Address, session: Session, ctx: ServerContext) -> Address | Reply:
    targets = await resolve(address)
    ips = [ip_of(t[1][0]) for t in targets]
    denial = ctx.judge.deny_resolved(session, ips)
    if denial is not None:
        session.close_reason = f"denied by rule {denial.rule_id}"
        return Reply.NOT_ALLOWED
    ips = sorted(ips, key=lambda ip: ip.version)  # IPv4 first, else in the resolver's order
    if session.protocol == "socks4" and ips[0].version != 4:
        session.close_reason = "resolve: no IPv4 address, which is all SOCKS4a can carry"
        return Reply.ADDRESS_TYPE_NOT_SUPPORTED
    return Address.of(str(ips[0]), 0)


async def _reverse(address: Address) -> Address | Reply:
    address = literal(address)
    if address.atyp == AddressType.DOMAIN:
        return Reply.ADDRESS_TYPE_NOT_SUPPORTED  # RESOLVE_PTR takes an address
    host = await resolver.current().reverse(address.host)
    name = host.encode("idna") if not host.isascii() else host.encode()
    if not 1 <= len(name) <= 255:
        return Reply.HOST_UNREACHABLE
    return Address(name.decode(), 0, AddressType.DOMAIN)
