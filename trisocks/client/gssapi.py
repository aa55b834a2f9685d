"""GSSAPI (RFC 1961) for the client: ``auth=GSSAPI()`` with the caller's Kerberos tickets.

The credentials are whatever the process has (``kinit``, ``KRB5CCNAME``); the proxy is named
``<service>/<host>@REALM``. The first context step asks the KDC for a service ticket and may
take a while, so it runs in a worker thread like every other step. After the exchange the
connection is a :class:`~trisocks.gss.stream.GssStream`: the request, the reply, relayed
bytes and UDP datagrams all travel wrapped at the agreed level.
"""

from __future__ import annotations

import attrs
import trio

from trisocks.client.errors import SocksAuthError
from trisocks.gss.stream import FrameChannel, GssFailure, GssStream, send_abort
from trisocks.protocol.errors import SocksError
from trisocks.protocol.gssapi import (
    GssAborted,
    MessageType,
    ProtectionLevel,
    acceptable_level,
    encode_protection_level,
    parse_protection_level,
)

__all__ = ["GSSAPI"]


@attrs.frozen
class GSSAPI:
    """Authenticate with GSS-API (Kerberos) and protect the connection.

    Only METHOD 01 is offered: a proxy cannot fall back to no authentication, and with it to
    no protection.
    """

    service: str = "socks"
    """Service part of the proxy's principal."""
    level: int = 2
    """1 integrity, 2 integrity and confidentiality, 3 "selective" (the proxy picks 1 or 2).
    A proxy answering with less than asked for is refused."""
    host: str | None = None
    """Host part of the proxy's principal; ``None``: the proxy's host as given (a name, not
    an IP literal, for Kerberos to find the principal)."""

    def __attrs_post_init__(self) -> None:
        ProtectionLevel(self.level)  # ValueError early, not at connection time

    async def establish(
        self, stream: trio.SocketStream, received: bytearray, proxy_host: str
    ) -> GssStream:
        """Run RFC 1961 §3-§4 after the proxy selected METHOD 01.

        Args:
            received: bytes already read past the method selection; consumed.
        Raises:
            SocksAuthError: no ticket, the proxy refused the context or aborted, or it chose
                a protection level below :attr:`level` (``01 FF`` has been sent).
        """
        from trisocks.gss import mech  # the optional extra trisocks[gssapi]

        requested = ProtectionLevel(self.level)
        channel = FrameChannel(stream, received)
        received.clear()
        initiator = mech.Initiator(self.service, self.host or proxy_host, requested)

        async def step(token: bytes | None) -> bytes | None:
            # abandon_on_cancel: a KDC that does not answer must not outlive the caller's
            # cancel scope; the thread left behind only ends a step of an unused context.
            return await trio.to_thread.run_sync(initiator.step, token, abandon_on_cancel=True)

        try:
            token = await step(None)
            while True:
                if token is not None:
                    await channel.send(MessageType.CONTEXT, token)
                if initiator.complete:
                    break
                token = await step(await channel.expect(MessageType.CONTEXT))
            octet = encode_protection_level(requested)
            await channel.send(MessageType.PROTECTION, initiator.wrap_level(octet))
            answer = initiator.unwrap_level(await channel.expect(MessageType.PROTECTION))
            chosen = parse_protection_level(answer)
            if not acceptable_level(requested, chosen):
                raise GssFailure(f"the proxy chose protection level {chosen}, "
                                 f"below the {requested} asked for")
        except (SocksError, GssFailure) as exc:
            if not isinstance(exc, GssAborted):
                await send_abort(stream)
            raise SocksAuthError(f"GSSAPI: {exc}") from exc
        return GssStream(stream, initiator.protection(chosen), bytes(channel.buffer))
