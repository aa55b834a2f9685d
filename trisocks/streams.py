"""A stream with bytes already received from it put back in front (no trio server or client
logic: both the server's protocol detection and the client library use it)."""

from __future__ import annotations

import trio

__all__ = ["Prefixed"]


class Prefixed(trio.abc.Stream):
    """*stream*, with *data* (already received from it) read first.

    Sending, ``send_eof`` (when *stream* has one) and closing go to *stream*. It is not a
    :class:`trio.abc.HalfCloseableStream` itself: whether it can half-close is the wrapped
    stream's (a TLS stream cannot); subclasses over one that can say so."""

    def __init__(self, stream: trio.abc.Stream, data: bytes) -> None:
        self.stream = stream
        """The wrapped stream."""
        self._prefix = bytearray(data)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if self._prefix:
            await trio.lowlevel.checkpoint()
            n = len(self._prefix) if max_bytes is None else max_bytes
            if n < 1:
                raise ValueError("max_bytes must be >= 1")
            data = bytes(self._prefix[:n])
            del self._prefix[:n]
            return data
        return await self.stream.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        send_eof = getattr(self.stream, "send_eof", None)
        if send_eof is None:
            raise trio.ClosedResourceError("the stream has no send_eof")
        await send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()
