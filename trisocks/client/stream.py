"""The stream a CONNECT or an accepted BIND gives: the proxy connection, minus the handshake."""

from __future__ import annotations

import trio

from trisocks.gss.stream import GssStream

__all__ = ["SocksStream"]


class SocksStream(trio.abc.HalfCloseableStream):
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
        self.stream = stream
        """The underlying connection to the proxy."""
        self.bound_address = bound_address
        """BND.ADDR/BND.PORT: the proxy's end of the relayed connection (for CONNECT, its
        outbound socket; for BIND, the listening address)."""
        self._leftover = leftover

    @property
    def socket(self) -> trio.socket.SocketType:
        """The socket to the proxy (for options such as ``TCP_NODELAY``)."""
        return self.stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._leftover:
            await trio.lowlevel.checkpoint()
            size = len(self._leftover) if max_bytes is None else max_bytes
            data, self._leftover = self._leftover[:size], self._leftover[size:]
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()
