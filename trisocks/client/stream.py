"""The stream a CONNECT or an accepted BIND gives: the proxy connection, minus the handshake."""

from __future__ import annotations

import trio

from trisocks.gss.stream import GssStream
from trisocks.streams import Prefixed

__all__ = ["SocksStream"]


class SocksStream(Prefixed, trio.abc.HalfCloseableStream):
    """A trio stream through the proxy.

    It wraps the :class:`trio.SocketStream` to the proxy; bytes that arrived together with the
    last reply are returned first by :meth:`receive_some`, so nothing the far end sent early
    is lost.
    """

    def __init__(
        self,
        stream: trio.SocketStream | GssStream,
        leftover: bytes,
        bound_address: tuple[str, int],
    ) -> None:
        super().__init__(stream, leftover)
        self.stream: trio.SocketStream | GssStream = stream
        """The underlying connection to the proxy."""
        self.bound_address = bound_address
        """BND.ADDR/BND.PORT: the proxy's end of the relayed connection (for CONNECT, its
        outbound socket; for BIND, the listening address)."""

    @property
    def socket(self) -> trio.socket.SocketType:
        """The socket to the proxy (for options such as ``TCP_NODELAY``)."""
        return self.stream.socket
