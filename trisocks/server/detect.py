"""Which protocol a client speaks, from its first byte (docs/protocols.md, "Detection").

``05`` is SOCKS5, ``04`` SOCKS4/4a, an ASCII letter the start of an HTTP/1.1 method token;
anything else is no protocol this server knows. The byte is not consumed:

- on a plain :class:`trio.SocketStream` it is peeked (``MSG_PEEK``), so the handshake, and
  the splice relay after it, read every byte from the socket itself;
- any other stream (TLS: a :class:`trio.SSLStream`) cannot peek: what one receive returned
  is handed back first by :class:`Prefixed`.
"""

from __future__ import annotations

import socket

import trio

__all__ = ["Prefixed", "classify", "detect"]

PEEK_SIZE = 1


def classify(first: int) -> str | None:
    """The protocol a first byte announces: ``socks5``, ``socks4``, ``http`` or ``None``."""
    if first == 5:
        return "socks5"
    if first == 4:
        return "socks4"
    if 0x41 <= first <= 0x5A or 0x61 <= first <= 0x7A:  # ASCII letters: a method token
        return "http"
    return None


class Prefixed(trio.abc.Stream):
    """*stream*, with *data* (already received from it) read first.

    Sending, ``send_eof``, closing and every attribute not defined here (``socket``,
    ``transport_stream``, ``getpeercert``, ...) go to *stream*."""

    def __init__(self, stream: trio.abc.Stream, data: bytes) -> None:
        self.stream = stream
        self._prefix = bytearray(data)

    def __getattr__(self, name: str) -> object:
        if name == "stream":  # not set yet (say, while copying): no recursion
            raise AttributeError(name)
        return getattr(self.stream, name)

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


async def detect(stream: trio.abc.Stream) -> tuple[str | None, trio.abc.Stream]:
    """The protocol the client's first byte announces (``None``: unknown) and the stream to
    read it from: *stream* itself when it could be peeked, else a :class:`Prefixed` holding
    what was read. The caller puts the timeout around it.

    Raises:
        EOFError: the client closed before sending a byte.
        OSError, trio.BrokenResourceError: the connection failed.
    """
    if isinstance(stream, trio.SocketStream):
        first = await stream.socket.recv(PEEK_SIZE, socket.MSG_PEEK)  # nothing consumed
        if not first:
            raise EOFError
        return classify(first[0]), stream
    data = await stream.receive_some(4096)
    if not data:
        raise EOFError
    return classify(data[0]), Prefixed(stream, bytes(data))
