"""SOCKS4 and SOCKS4a messages (and Tor's RESOLVE over SOCKS4a), sans-IO.

Request: VN=4 | CD | DSTPORT (2) | DSTIP (4) | USERID | NUL, and for SOCKS4a (DSTIP 0.0.0.x,
x != 0) a domain name and NUL after it. Reply: VN=0 | CD | DSTPORT | DSTIP, CD 5A granted or
5B rejected/failed (this server sends no other).

Like :mod:`trisocks.protocol.socks5`, :func:`parse_socks4_request` returns ``None`` while the
buffer holds only part of a request and ``(request, used)`` once it is complete; anything
malformed raises :class:`Socks4Error` (USERID and the domain are capped at 255 bytes, so an
endless one is refused rather than buffered).
"""

from __future__ import annotations

import ipaddress
import struct

import attrs

from trisocks.protocol.errors import SocksError
from trisocks.protocol.socks5 import Address, AddressType, Command

__all__ = [
    "GRANTED",
    "MAX_FIELD",
    "REJECTED",
    "Socks4Error",
    "Socks4Reply",
    "Socks4Request",
    "encode_socks4_reply",
    "encode_socks4_request",
    "parse_socks4_reply",
    "parse_socks4_request",
]

VERSION = 4
GRANTED = 0x5A
REJECTED = 0x5B
MAX_FIELD = 255
"""Longest USERID, and longest SOCKS4a domain, in bytes (without the NUL)."""
COMMANDS = {1: Command.CONNECT, 2: Command.BIND, 0xF0: Command.RESOLVE}
"""CD values: SOCKS4's CONNECT and BIND, Tor's RESOLVE (SOCKS4a only names the host)."""
_HEAD = struct.Struct("!BBH4s")


class Socks4Error(SocksError):
    """A malformed SOCKS4 request: answered with CD 5B, then the connection closes."""

    reply = None


@attrs.frozen
class Socks4Request:
    """A SOCKS4 or SOCKS4a request."""

    command: Command
    address: Address
    """DSTIP:DSTPORT, or for SOCKS4a the domain and DSTPORT."""
    userid: bytes


def _field(buf: bytes | bytearray, start: int, what: str) -> tuple[bytes, int] | None:
    """A NUL-terminated field at *start*: its bytes and the offset past the NUL."""
    end = buf.find(0, start, start + MAX_FIELD + 1)
    if end < 0:
        if len(buf) > start + MAX_FIELD:
            raise Socks4Error(f"{what} longer than {MAX_FIELD} bytes")
        return None
    return bytes(buf[start:end]), end + 1


def parse_socks4_request(buf: bytes | bytearray) -> tuple[Socks4Request, int] | None:
    """Parse a SOCKS4/4a request at the start of *buf*."""
    if buf and buf[0] != VERSION:
        raise Socks4Error(f"expected SOCKS version 4, got {buf[0]}")
    if len(buf) >= 2 and buf[1] not in COMMANDS:
        raise Socks4Error(f"unknown command {buf[1]:#04x}")
    if len(buf) < _HEAD.size:
        return None
    _, cd, port, ip = _HEAD.unpack_from(buf)
    userid = _field(buf, _HEAD.size, "USERID")
    if userid is None:
        return None
    user, pos = userid
    command = COMMANDS[cd]
    if ip[:3] == b"\0\0\0" and ip[3] != 0:  # SOCKS4a: the name follows
        name = _field(buf, pos, "domain name")
        if name is None:
            return None
        raw, pos = name
        if not raw:
            raise Socks4Error("empty domain name")
        try:
            host = raw.decode()
        except UnicodeDecodeError:
            raise Socks4Error("domain name is not valid UTF-8") from None
        address = Address(host, port, AddressType.DOMAIN)
    elif command == Command.RESOLVE:
        raise Socks4Error("RESOLVE needs a SOCKS4a domain name")
    else:
        address = Address(str(ipaddress.IPv4Address(ip)), port, AddressType.IPV4)
    return Socks4Request(command, address, user), pos


def encode_socks4_request(
    command: int, address: Address | tuple[str, int], userid: bytes = b""
) -> bytes:
    """Client side: a request; a domain goes the SOCKS4a way (DSTIP 0.0.0.1)."""
    if isinstance(address, tuple):
        address = Address.of(*address)
    if address.atyp == AddressType.IPV6:
        raise ValueError("SOCKS4 carries only IPv4 addresses")
    head = struct.pack("!BBH", VERSION, command, address.port)
    if address.atyp == AddressType.DOMAIN:
        return head + b"\0\0\0\1" + userid + b"\0" + address.host.encode() + b"\0"
    return head + ipaddress.IPv4Address(address.host).packed + userid + b"\0"


def encode_socks4_reply(granted: bool, address: Address | None = None) -> bytes:
    """Server side: VN=0 | CD | DSTPORT | DSTIP. An address SOCKS4 cannot carry (IPv6, a
    name) keeps its port and gets DSTIP 0.0.0.0."""
    port, ip = 0, b"\0\0\0\0"
    if address is not None:
        port = address.port
        if address.atyp == AddressType.IPV4:
            ip = ipaddress.IPv4Address(address.host).packed
    return _HEAD.pack(0, GRANTED if granted else REJECTED, port, ip)


@attrs.frozen
class Socks4Reply:
    """A reply as the client sees it."""

    code: int
    address: Address


def parse_socks4_reply(buf: bytes | bytearray) -> tuple[Socks4Reply, int] | None:
    """Client side: one reply (either of BIND's two)."""
    if len(buf) < _HEAD.size:
        return None
    vn, cd, port, ip = _HEAD.unpack_from(buf)
    if vn != 0:
        raise Socks4Error(f"reply with version {vn}")
    return Socks4Reply(cd, Address(str(ipaddress.IPv4Address(ip)), port, AddressType.IPV4)), 8
