"""UDP ASSOCIATE through a SOCKS5 proxy (RFC 1928 §7).

Datagrams carry the UDP request header both ways. Sending can split a datagram into
fragments (``fragment_size``), which exercises a proxy's reassembly. Receiving drops
fragmented datagrams (FRAG ≠ 0) instead of reassembling them: RFC 1928 allows an
implementation that does not reassemble to do so, and proxies (trisocks among them) never
fragment what they send. Malformed datagrams are dropped too: UDP has no one to complain to.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import AsyncIterator

import trio

from trisocks.client.handshake import Auth, Connect, ProxyAddress, connect_control
from trisocks.gss.stream import GssStream
from trisocks.protocol import (
    Address,
    Command,
    SocksError,
    encode_udp_header,
    fragment,
    parse_udp_header,
)

__all__ = ["SocksDatagramSocket", "open_socks_udp"]

MAX_DATAGRAM = 65536


class SocksDatagramSocket:
    """A UDP socket whose datagrams go through the proxy's relay."""

    def __init__(
        self,
        sock: trio.socket.SocketType,
        relay: Address,
        fragment_size: int | None,
        gss: GssStream | None = None,
    ) -> None:
        self._sock = sock
        self._fragment_size = fragment_size
        self._gss = gss
        """After GSSAPI, each datagram travels as one wrapped frame (RFC 1961 §5)."""
        self.relay_address: tuple[str, int] = (relay.host, relay.port)
        """The proxy's UDP relay (BND.ADDR/BND.PORT of the reply)."""

    async def send_to(self, data: bytes, address: tuple[str, int]) -> None:
        """Send *data* to *address* (an IP literal or a domain the proxy resolves).

        Raises:
            ValueError: with ``fragment_size``, *data* needs more than 127 fragments.
            OSError: the datagram cannot be sent (for instance, too large).
        """
        target = Address.of(*address)
        if self._fragment_size is None:
            datagrams = [encode_udp_header(target) + data]
        else:
            datagrams = fragment(target, data, self._fragment_size)
        for datagram in datagrams:
            await self._sock.send(self._gss.wrap_datagram(datagram) if self._gss else datagram)

    async def receive_from(self) -> tuple[bytes, tuple[str, int]]:
        """Wait for the next datagram relayed to us.

        If the proxy ends the association this waits on; bound it with a trio cancel scope.

        Returns:
            The payload and its source ``(host, port)`` as the proxy names it.
        """
        while True:
            datagram = await self._sock.recv(MAX_DATAGRAM)
            try:
                if self._gss is not None:
                    datagram = self._gss.unwrap_datagram(datagram)
                header = parse_udp_header(datagram)
            except SocksError:
                continue
            if header.frag == 0:
                source = header.address
                return datagram[header.offset :], (source.host, source.port)


@contextlib.asynccontextmanager
async def open_socks_udp(
    proxy: ProxyAddress, *, auth: Auth = None, fragment_size: int | None = None,
    connect: Connect | None = None,
) -> AsyncIterator[SocksDatagramSocket]:
    """Open a UDP association through *proxy*; it lasts as long as the block.

    The local UDP socket is bound before the request, on the interface that reaches the
    proxy, and its address is sent as DST.ADDR/DST.PORT so the proxy can admit only it. The
    socket is then connected to the relay, so the kernel drops datagrams from anyone else.

    Args:
        proxy: the SOCKS5 server, ``(host, port)`` or ``"host:port"``.
        auth: ``(username, password)`` for RFC 1929, or ``None``.
        fragment_size: split outgoing datagrams into fragments of at most this many DATA
            bytes (RFC 1928 §7); ``None`` sends every datagram whole.
        connect: how to reach the proxy (an async callable returning a connected stream),
            instead of connecting to *proxy* directly; the UDP socket is bound on the
            stream's local address.
    Returns:
        A :class:`SocksDatagramSocket`. Leaving the block closes the UDP socket and the TCP
        control connection, which ends the association.
    Raises:
        OSError: the proxy cannot be reached.
        SocksAuthError: no acceptable method, or wrong credentials.
        SocksReplyError: the proxy refused; ``.reply`` holds the REP code.
        SocksProtocolError: the proxy broke the protocol.
    """
    control = await connect_control(proxy, auth, connect)
    async with control.stream:
        local = control.stream.socket.getsockname()
        with trio.socket.socket(control.stream.socket.family, socket.SOCK_DGRAM) as sock:
            await sock.bind((local[0], 0, *local[2:]))
            own = sock.getsockname()
            relay = await control.request(Command.UDP_ASSOCIATE, Address.of(own[0], own[1]))
            await sock.connect((relay.host, relay.port))
            gss = control.stream if isinstance(control.stream, GssStream) else None
            yield SocksDatagramSocket(sock, relay, fragment_size, gss)
