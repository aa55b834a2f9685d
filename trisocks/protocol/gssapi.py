"""RFC 1961, the GSS-API method: framing, the abort message and protection-level choice.

Once METHOD 01 is selected, every message on the connection is a frame (RFC 1961 §3-§5)::

    VER=01 | MTYP | LEN(2) | TOKEN          MTYP 1 context, 2 protection level, 3 user data
    VER=01 | MTYP=FF                       abort (no length, no token): close after it

Tokens are opaque here. Producing and checking them is the GSS-API library's job (and may
block on the KDC), so it stays out of this sans-IO module; this one only frames, which is what
must survive any split of the byte stream and any junk a peer sends.

Rules the parser keeps:

1. VER must be 1 and MTYP one of 1, 2, 3; a frame whose MTYP is not the one the caller
   expects at this point of the exchange is an error too (a peer cannot skip a step).
2. ``01 FF`` raises :class:`GssAborted` wherever a frame is expected.
3. LEN is 16 bits, so a frame is at most 65539 bytes: buffering is bounded by the format.
"""

from __future__ import annotations

import enum
from collections.abc import Collection

import attrs

from trisocks.protocol.errors import SocksError

__all__ = [
    "ABORT",
    "MAX_TOKEN",
    "Frame",
    "GssAborted",
    "GssProtocolError",
    "MessageType",
    "ProtectionLevel",
    "acceptable_level",
    "choose_level",
    "encode_frame",
    "encode_protection_level",
    "parse_datagram",
    "parse_frame",
    "parse_protection_level",
]

GSS_VERSION = 1
ABORT = bytes([GSS_VERSION, 0xFF])
"""RFC 1961 §3.8: sent by either side on any failure, then the connection is closed."""
MAX_TOKEN = 0xFFFF
"""LEN is two octets."""
_HEADER = 4


class MessageType(enum.IntEnum):
    """MTYP values of RFC 1961."""

    CONTEXT = 1
    """Security context establishment (§3), repeated while either side needs more."""
    PROTECTION = 2
    """Protection-level negotiation (§4): one octet, wrapped without confidentiality."""
    ENCAPSULATED = 3
    """Per-message protected user data (§5)."""


class ProtectionLevel(enum.IntEnum):
    """The protection-level octet (RFC 1961 §4.3)."""

    INTEGRITY = 1
    CONFIDENTIALITY = 2
    """Integrity and confidentiality."""
    SELECTIVE = 3
    """Per-message choice by local configuration; never agreed to here (see choose_level)."""


class GssProtocolError(SocksError):
    """A frame breaks RFC 1961 (bad VER, unknown or unexpected MTYP, wrong size)."""

    reply = None


class GssAborted(SocksError):
    """The peer sent ``01 FF``."""

    reply = None


@attrs.frozen
class Frame:
    """VER=1 | MTYP | LEN | TOKEN."""

    mtyp: MessageType
    token: bytes


def encode_frame(mtyp: MessageType, token: bytes) -> bytes:
    """One frame; *token* must fit LEN (ValueError otherwise: a caller bug, not the peer's)."""
    if len(token) > MAX_TOKEN:
        raise ValueError(f"token of {len(token)} bytes does not fit a 16-bit length")
    return bytes([GSS_VERSION, mtyp]) + len(token).to_bytes(2, "big") + token


def parse_frame(buf: bytes | bytearray, expect: MessageType) -> tuple[Frame, int] | None:
    """Parse the frame at the front of *buf*; ``None`` means it is still incomplete.

    Raises:
        GssAborted: the peer sent ``01 FF``.
        GssProtocolError: rule 1.
    """
    if not buf:
        return None
    if buf[0] != GSS_VERSION:
        raise GssProtocolError(f"GSS-API frame version {buf[0]}, expected 1")
    if len(buf) < 2:
        return None
    mtyp = buf[1]
    if mtyp == ABORT[1]:
        raise GssAborted("peer aborted the GSS-API exchange")
    if mtyp != expect:
        raise GssProtocolError(f"GSS-API message type {mtyp}, expected {int(expect)}")
    if len(buf) < _HEADER:
        return None
    end = _HEADER + int.from_bytes(buf[2:4], "big")
    if len(buf) < end:
        return None
    return Frame(MessageType(mtyp), bytes(buf[_HEADER:end])), end


def parse_datagram(datagram: bytes | bytearray) -> bytes:
    """The token of a UDP datagram, which must be exactly one MTYP 3 frame (a datagram is
    never split, so "incomplete" is an error here)."""
    parsed = parse_frame(datagram, MessageType.ENCAPSULATED)
    if parsed is None or parsed[1] != len(datagram):
        raise GssProtocolError("UDP datagram is not exactly one GSS-API frame")
    return parsed[0].token


def encode_protection_level(level: ProtectionLevel) -> bytes:
    """The octet to wrap (without confidentiality, §4.4) into a MTYP 2 token."""
    return bytes([level])


def parse_protection_level(octets: bytes) -> ProtectionLevel:
    """The unwrapped MTYP 2 token: exactly one octet, 1..3."""
    if len(octets) != 1 or not 1 <= octets[0] <= 3:
        raise GssProtocolError(f"protection level must be one octet 1..3, got {octets!r}")
    return ProtectionLevel(octets[0])


def choose_level(
    requested: ProtectionLevel, accepted: Collection[ProtectionLevel]
) -> ProtectionLevel:
    """The server's answer to *requested* (RFC 1961 §4.3 lets it differ from the request).

    The requested level when accepted; otherwise the accepted level nearest to it, the
    stronger one on a tie. So "selective" (3) becomes confidentiality (2) when that is
    accepted and integrity (1) otherwise: selective protection needs a per-message policy
    that neither side can express in SOCKS.
    """
    if not accepted:
        raise ValueError("no accepted protection level")
    return min(accepted, key=lambda level: (abs(level - requested), -level))


def acceptable_level(requested: ProtectionLevel, chosen: ProtectionLevel) -> bool:
    """The client's check of the server's answer (§4.4: if it is unacceptable, close).

    At least the protection asked for; for "selective", integrity or confidentiality. A
    chosen "selective" is never acceptable: nothing here can apply a per-message policy.
    """
    if chosen == ProtectionLevel.SELECTIVE:
        return False
    return requested == ProtectionLevel.SELECTIVE or chosen >= requested
