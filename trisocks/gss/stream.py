"""RFC 1961 on a trio connection: frame I/O and the protected stream.

Rules:

1. After protection-level negotiation every byte either side sends is in MTYP 3 frames
   (RFC 1961 §5); :class:`GssStream` hides them, so SOCKS code reads and writes plain bytes.
2. Each wrapped token must fit LEN (16 bits): plaintext goes out in pieces of at most
   :attr:`Protection.max_plaintext` bytes, which the mechanism computes from that limit
   (``gss_wrap_size_limit``).
3. Any GSS-API failure (a frame that does not parse, a token that does not unwrap, the wrong
   protection on a token, the peer's abort) sends ``01 FF`` unless the peer aborted, closes
   the connection and raises :class:`trio.BrokenResourceError`. Frames never interleave:
   sends, the abort included, take the stream's send lock.
4. RFC 1961 has no end-of-data message, so EOF is TCP's: ``send_eof`` half-closes the
   connection and a clean EOF between frames reads as ``b""``; EOF inside a frame is a failure.

Wrapping and unwrapping run on the trio thread: they are CPU-bound, bounded by one frame,
and take microseconds; only context establishment may block (see ``mech``).
"""

from __future__ import annotations

import errno
from typing import Protocol

import trio

from trisocks.protocol.errors import SocksError
from trisocks.protocol.gssapi import (
    ABORT,
    MAX_TOKEN,
    GssAborted,
    GssProtocolError,
    MessageType,
    encode_frame,
    parse_datagram,
    parse_frame,
)

__all__ = ["FrameChannel", "GssFailure", "GssStream", "Protection", "send_abort"]

RECEIVE_SIZE = 65536 + 4
"""One maximal frame."""
ABORT_GRACE = 1.0
"""How long the ``01 FF`` may wait behind a frame being sent before the connection just closes."""


class GssFailure(Exception):
    """The GSS-API library refused a token, or the exchange broke off."""


class Protection(Protocol):
    """An established context at the agreed protection level (RFC 1961 §5: level 1 wraps
    without confidentiality, level 2 with it)."""

    max_plaintext: int
    """The largest plaintext whose wrapped token fits LEN."""

    def wrap(self, data: bytes) -> bytes: ...

    def unwrap(self, token: bytes) -> bytes:
        """Raises GssFailure: the token is forged, tampered, replayed or not at the level."""
        ...


async def send_abort(stream: trio.abc.SendStream) -> None:
    """Send ``01 FF`` (RFC 1961 §3.8), best effort: the connection is closed right after."""
    with trio.move_on_after(ABORT_GRACE):
        try:
            await stream.send_all(ABORT)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


class FrameChannel:
    """Whole frames over a byte stream; what arrives beyond a frame stays buffered."""

    def __init__(self, stream: trio.abc.Stream, buffered: bytes | bytearray = b"") -> None:
        self.stream = stream
        self.buffer = bytearray(buffered)

    async def receive(self, expect: MessageType) -> bytes | None:
        """The next frame's token; ``None`` on a clean EOF between frames.

        Raises:
            SocksError: the frame breaks RFC 1961, or is the peer's abort.
            GssFailure: EOF inside a frame.
        """
        while (parsed := parse_frame(self.buffer, expect)) is None:
            data = await self.stream.receive_some(RECEIVE_SIZE)
            if not data:
                if self.buffer:
                    raise GssFailure("connection closed inside a GSS-API frame")
                return None
            self.buffer += data
        frame, used = parsed
        del self.buffer[:used]
        return frame.token

    async def expect(self, mtyp: MessageType) -> bytes:
        """Like :meth:`receive` during the handshake, where EOF is a failure too."""
        token = await self.receive(mtyp)
        if token is None:
            raise GssFailure("connection closed during the GSS-API exchange")
        return token

    async def send(self, mtyp: MessageType, token: bytes) -> None:
        await self.stream.send_all(encode_frame(mtyp, token))


class GssStream(trio.abc.HalfCloseableStream):
    """A connection after RFC 1961 negotiation, as a plain byte stream (rules 1-4): the
    server's relay moves it like any half-closeable stream (``receive_some``, ``send_all``,
    ``send_eof``), so what it counts and throttles is payload, never the wrapping.

    ``socket`` is the transport's, so code that asks the client connection for its addresses
    works on either kind of stream.
    """

    def __init__(
        self, transport: trio.SocketStream, protection: Protection, buffered: bytes = b""
    ) -> None:
        self.transport = transport
        self.protection = protection
        self._frames = FrameChannel(transport, buffered)
        self._plain = b""
        self._send_lock = trio.Lock()

    @property
    def socket(self) -> trio.socket.SocketType:
        return self.transport.socket

    def wrap_frames(self, data: bytes | bytearray | memoryview) -> bytes:
        """*data* as MTYP 3 frames, cut to fit LEN (rule 2)."""
        view, step = memoryview(data), self.protection.max_plaintext
        return b"".join(
            encode_frame(MessageType.ENCAPSULATED, self.protection.wrap(bytes(view[i : i + step])))
            for i in range(0, len(view), step)
        )

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        frames = self.wrap_frames(data)
        async with self._send_lock:
            await self.transport.send_all(frames)

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        async with self._send_lock:
            await self.transport.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        if not self._plain:
            self._plain = await self._receive_payload()
        cut = len(self._plain) if max_bytes is None else max_bytes
        chunk, self._plain = self._plain[:cut], self._plain[cut:]
        return chunk

    async def _receive_payload(self) -> bytes:
        try:
            while (token := await self._frames.receive(MessageType.ENCAPSULATED)) is not None:
                if payload := self.protection.unwrap(token):
                    return payload
            return b""
        except (SocksError, GssFailure) as exc:
            await self._abort(answer=not isinstance(exc, GssAborted))
            raise trio.BrokenResourceError(f"GSS-API: {exc}") from exc

    async def _abort(self, *, answer: bool) -> None:
        """Rule 3: send ``01 FF`` (when *answer*) between frames, then close the transport."""
        if answer:
            with trio.move_on_after(ABORT_GRACE):
                async with self._send_lock:
                    await send_abort(self.transport)
        await self.transport.aclose()

    async def aclose(self) -> None:
        await self.transport.aclose()

    def wrap_datagram(self, datagram: bytes) -> bytes:
        """A UDP datagram (SOCKS header and DATA) as the one frame RFC 1961 §5 sends in its
        place.

        Raises:
            OSError: EMSGSIZE, the wrapped token does not fit LEN (as ``sendto`` would).
        """
        token = self.protection.wrap(datagram)
        if len(token) > MAX_TOKEN:
            raise OSError(errno.EMSGSIZE, "datagram too large for one GSS-API frame")
        return encode_frame(MessageType.ENCAPSULATED, token)

    def unwrap_datagram(self, datagram: bytes) -> bytes:
        """The SOCKS datagram inside a received one.

        Raises:
            GssProtocolError: not exactly one frame, or a token that does not unwrap (UDP has
                no one to abort: the caller drops it like any malformed datagram).
        """
        try:
            return self.protection.unwrap(parse_datagram(datagram))
        except GssFailure as exc:
            raise GssProtocolError(str(exc)) from None
