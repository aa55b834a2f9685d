"""Giving a session its identity: a password login through the chain (``ctx.logins``), or an
identity another layer vouched for (GSSAPI, a TLS client certificate)."""

from __future__ import annotations

from trisocks.identity.model import Identity, LoginRequest
from trisocks.net import format_sockaddr, socket_of
from trisocks.server.context import ServerContext
from trisocks.sessions import Session

__all__ = ["identify", "password_login"]


def identify(session: Session, identity: Identity) -> None:
    """Make *identity* the session's: its account is the session's user."""
    session.user = identity.account
    session.source = identity.source
    session.groups = identity.groups


async def password_login(
    ctx: ServerContext, session: Session, stream: object, user: bytes, password: bytes,
    method: str,
) -> Identity | None:
    """Check *user* and *password* through the chain (first answer wins; a backend that cannot
    answer fails closed); the caller makes the identity the session's (:func:`identify`).

    The check waits on us, not on the client: the handshake holds no slot meanwhile
    (:meth:`~trisocks.server.admission.Admission.server_work`)."""
    try:
        listener = format_sockaddr(socket_of(stream).getsockname())
    except (OSError, TypeError):
        listener = ""
    request = LoginRequest(user, password, client=session.client.host, listener=listener,
                           method=method)
    with ctx.admission.server_work():  # not stalled: not evictable meanwhile
        return await ctx.logins.login(request)
