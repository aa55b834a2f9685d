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

from trisocks import streams

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


class Prefixed(streams.Prefixed):
    """:class:`trisocks.streams.Prefixed`, and every attribute not defined there (``socket``,
    ``transport_stream``, ``getpeercert``, ...) from the wrapped stream, which the session
    code asks of a TLS stream."""

    def __getattr__(self, name: str) -> object:
        if name == "stream":  # not set yet (say, while copying): no recursion
            raise AttributeError(name)
        return getattr(self.stream, name)


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
