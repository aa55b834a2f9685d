"""The UDP request header (RFC 1928 §7) and fragment reassembly.

``RSV(2)=0 | FRAG | ATYP | DST.ADDR | DST.PORT | DATA``. FRAG 0 is a standalone datagram;
otherwise its low 7 bits are the fragment's position (1..127) and the high bit marks the last
fragment of the sequence.

Reassembly rules (RFC 1928 §7), as :class:`Reassembler` keeps them:

1. One queue per association, with a timer started by the first fragment of a sequence. The
   timer is never shorter than 5 s (the RFC's "MUST be no less than 5 seconds").
2. The queue is dropped when the timer expires, and reinitialised when a datagram arrives whose
   position is lower than the highest seen in the current sequence (a standalone datagram, FRAG
   0, counts as lower than any position and is delivered as it is).
3. A sequence is complete when the fragment marked last arrives and positions 1..n are all
   present; the DATA parts are joined in order and delivered to the first fragment's address.
   A last fragment with a gap before it ends the sequence without delivering anything.
4. The queue is bounded in bytes and fragments; going over drops it.
"""

from __future__ import annotations

import attrs

from trisocks.protocol.errors import MalformedMessage
from trisocks.protocol.socks5 import Address, parse_address

__all__ = [
    "MIN_REASSEMBLY_TIMEOUT",
    "Reassembler",
    "UdpHeader",
    "encode_udp_header",
    "fragment",
    "parse_udp_header",
]

MIN_REASSEMBLY_TIMEOUT = 5.0
LAST_FRAGMENT = 0x80


@attrs.frozen
class UdpHeader:
    """A parsed UDP request header; DATA starts at ``offset`` in the datagram."""

    frag: int
    address: Address
    offset: int

    @property
    def position(self) -> int:
        """The fragment's position, 1..127, or 0 for a standalone datagram."""
        return self.frag & 0x7F

    @property
    def is_last(self) -> bool:
        return bool(self.frag & LAST_FRAGMENT)


def parse_udp_header(datagram: bytes | bytearray | memoryview) -> UdpHeader:
    """Parse the header at the front of a whole datagram (UDP never splits one)."""
    buf = bytes(datagram[:262]) if isinstance(datagram, memoryview) else datagram
    if len(buf) < 4:
        raise MalformedMessage("datagram shorter than a UDP request header")
    if buf[0] or buf[1]:
        raise MalformedMessage("RSV of a UDP datagram must be 0")
    frag = buf[2]
    if frag == LAST_FRAGMENT:
        raise MalformedMessage("FRAG 0x80 names no position")
    parsed = parse_address(buf, 3)
    if parsed is None:
        raise MalformedMessage("datagram ends inside its address")
    address, offset = parsed
    return UdpHeader(frag, address, offset)


def encode_udp_header(address: Address, frag: int = 0) -> bytes:
    """The header to put in front of DATA (towards the client, *address* names the source)."""
    return bytes([0, 0, frag]) + address.encode()


def fragment(address: Address, data: bytes, size: int) -> list[bytes]:
    """Split *data* into whole datagrams of at most *size* DATA bytes each (client side).

    Data that fits in one piece is sent standalone (FRAG 0)."""
    if size < 1:
        raise ValueError("fragment size must be positive")
    pieces = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
    if len(pieces) == 1:
        return [encode_udp_header(address) + data]
    if len(pieces) > 127:
        raise ValueError("more than 127 fragments")
    last = len(pieces)
    return [
        encode_udp_header(address, n | (LAST_FRAGMENT if n == last else 0)) + piece
        for n, piece in enumerate(pieces, start=1)
    ]


@attrs.define
class Reassembler:
    """One association's reassembly queue; time is passed in, so tests own the clock."""

    timeout: float = MIN_REASSEMBLY_TIMEOUT
    """Seconds from a sequence's first fragment until the queue is dropped."""
    max_bytes: int = 65535
    """DATA bytes a queue may hold; over that the queue is dropped."""
    max_fragments: int = 127
    deadline: float | None = None
    """When the current queue expires; ``None`` while no sequence is open."""
    completed: int = 0
    """Sequences reassembled and delivered."""
    dropped: int = 0
    """Queues given up: expired, reset by a lower position, over a bound, or with a gap."""
    _address: Address | None = None
    _parts: list[bytes] = attrs.Factory(list)
    _bytes: int = 0
    _highest: int = 0

    def __attrs_post_init__(self) -> None:
        if self.timeout < MIN_REASSEMBLY_TIMEOUT:
            raise ValueError("RFC 1928 §7: the reassembly timer must be no less than 5 seconds")

    def feed(self, header: UdpHeader, data: bytes, now: float) -> tuple[Address, bytes] | None:
        """Take one datagram; return ``(address, data)`` when something is ready to send."""
        self.expire(now)
        position = header.position
        if position <= self._highest or position == 0:
            self._drop()
        if position == 0:
            return header.address, data
        if self._highest == 0:
            self._address = header.address
            self.deadline = now + self.timeout
        elif header.address != self._address:
            self._drop()
            self._address = header.address
            self.deadline = now + self.timeout
        self._highest = position
        self._parts.append(data)
        self._bytes += len(data)
        if self._bytes > self.max_bytes or len(self._parts) > self.max_fragments:
            self._drop()
            return None
        if not header.is_last:
            return None
        complete = len(self._parts) == position
        address, parts = self._address, self._parts
        self._reset()
        if not complete or address is None:
            self.dropped += 1
            return None
        self.completed += 1
        return address, b"".join(parts)

    def expire(self, now: float) -> bool:
        """Drop the queue if its timer has run out; True if it did."""
        if self.deadline is not None and now >= self.deadline:
            self._drop()
            return True
        return False

    @property
    def pending(self) -> int:
        """Fragments waiting in the queue."""
        return len(self._parts)

    def _drop(self) -> None:
        if self._parts:
            self.dropped += 1
        self._reset()

    def _reset(self) -> None:
        self._address = None
        self._parts = []
        self._bytes = 0
        self._highest = 0
        self.deadline = None
