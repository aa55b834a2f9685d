"""RFC 1928 messages: greeting, method selection, request and reply.

Parsers are incremental: ``parse_x(buf)`` returns ``None`` while *buf* holds only part of a
message and ``(message, used)`` once it is complete, leaving whatever follows to the caller.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import struct

import attrs

from trisocks.protocol.errors import (
    AddressTypeNotSupported,
    BadVersion,
    CommandNotSupported,
    MalformedMessage,
    Reply,
)

__all__ = [
    "ALL_COMMANDS",
    "RFC_COMMANDS",
    "Address",
    "AddressType",
    "Command",
    "Greeting",
    "Method",
    "Reply",
    "Request",
    "ServerReply",
    "encode_greeting",
    "encode_method_selection",
    "encode_reply",
    "encode_request",
    "parse_address",
    "parse_greeting",
    "parse_method_selection",
    "parse_reply",
    "parse_request",
]

VERSION = 5
_PORT = struct.Struct("!H")


class Method(enum.IntEnum):
    """Authentication METHOD values (RFC 1928 §3)."""

    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF


class Command(enum.IntEnum):
    """CMD values (RFC 1928 §4), and Tor's two (socks-extensions.txt)."""

    CONNECT = 0x01
    BIND = 0x02
    UDP_ASSOCIATE = 0x03
    RESOLVE = 0xF0
    """Tor: resolve DST.ADDR (a domain); the reply's BND.ADDR is the address."""
    RESOLVE_PTR = 0xF1
    """Tor: reverse-resolve DST.ADDR (an IP); the reply's BND.ADDR is the name."""


RFC_COMMANDS = frozenset({Command.CONNECT, Command.BIND, Command.UDP_ASSOCIATE})
"""What RFC 1928 defines: all :func:`parse_request` accepts unless told more."""
ALL_COMMANDS = frozenset(Command)
"""RFC 1928's commands and Tor's RESOLVE and RESOLVE_PTR."""


class AddressType(enum.IntEnum):
    """ATYP values (RFC 1928 §5)."""

    IPV4 = 0x01
    DOMAIN = 0x03
    IPV6 = 0x04


@attrs.frozen
class Address:
    """DST.ADDR/DST.PORT or BND.ADDR/BND.PORT."""

    host: str
    """An IPv4 or IPv6 literal (canonical text form) or a domain name."""
    port: int
    """0..65535."""
    atyp: AddressType
    """How *host* travels on the wire."""

    @classmethod
    def of(cls, host: str, port: int) -> Address:
        """Build an address, choosing ATYP from the text of *host*."""
        text, atyp = _kind_of(host)
        return cls(text, port, atyp)

    @property
    def is_unspecified(self) -> bool:
        """True for 0.0.0.0 / :: (RFC 1928: "zeros if unknown")."""
        return self.atyp != AddressType.DOMAIN and ipaddress.ip_address(self.host).is_unspecified

    def __str__(self) -> str:
        if self.atyp == AddressType.IPV6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"

    def encode(self) -> bytes:
        """ATYP | ADDR | PORT as on the wire."""
        if self.atyp != AddressType.DOMAIN:
            body = _packed(self.host, self.atyp)
        else:
            name = self.host.encode()
            if not 1 <= len(name) <= 255:
                raise ValueError(f"domain name must be 1..255 bytes, got {len(name)}")
            body = bytes([len(name)]) + name
        return bytes([self.atyp]) + body + _PORT.pack(self.port)


@functools.lru_cache(maxsize=4096)
def _kind_of(host: str) -> tuple[str, AddressType]:
    """*host* in its normal text form, and the ATYP it travels as (cached: the same peers
    and targets come back again and again, and parsing costs more than the rest)."""
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host, AddressType.DOMAIN
    return str(ip), AddressType.IPV4 if ip.version == 4 else AddressType.IPV6


@functools.lru_cache(maxsize=4096)
def _packed(host: str, atyp: AddressType) -> bytes:
    if atyp == AddressType.IPV4:
        return ipaddress.IPv4Address(host).packed
    return ipaddress.IPv6Address(host).packed


def parse_address(buf: bytes | bytearray, start: int) -> tuple[Address, int] | None:
    """Parse ATYP | ADDR | PORT at *start*; return the address and the offset past it."""
    if len(buf) <= start:
        return None
    atyp = buf[start]
    pos = start + 1
    if atyp == AddressType.IPV4:
        end = pos + 4
        if len(buf) < end + 2:
            return None
        host = str(ipaddress.IPv4Address(bytes(buf[pos:end])))
    elif atyp == AddressType.IPV6:
        end = pos + 16
        if len(buf) < end + 2:
            return None
        host = str(ipaddress.IPv6Address(bytes(buf[pos:end])))
    elif atyp == AddressType.DOMAIN:
        if len(buf) <= pos:
            return None
        length = buf[pos]
        if length == 0:
            raise MalformedMessage("empty domain name")
        pos += 1
        end = pos + length
        if len(buf) < end + 2:
            return None
        raw = bytes(buf[pos:end])
        if 0 in raw:
            raise MalformedMessage("NUL byte in domain name")
        try:
            host = raw.decode()
        except UnicodeDecodeError as exc:
            raise MalformedMessage("domain name is not valid UTF-8") from exc
    else:
        raise AddressTypeNotSupported(f"unknown ATYP {atyp:#04x}")
    (port,) = _PORT.unpack_from(buf, end)
    return Address(host, port, AddressType(atyp)), end + 2


# --- greeting (client -> server) and method selection (server -> client) ------------------


@attrs.frozen
class Greeting:
    """VER | NMETHODS | METHODS: the methods a client offers, in its order."""

    methods: tuple[int, ...]


def parse_greeting(buf: bytes | bytearray) -> tuple[Greeting, int] | None:
    """Parse a client greeting. NMETHODS = 0 is legal and simply offers nothing."""
    if not buf:
        return None
    if buf[0] != VERSION:
        raise BadVersion(f"expected SOCKS version 5, got {buf[0]}")
    if len(buf) < 2:
        return None
    end = 2 + buf[1]
    if len(buf) < end:
        return None
    return Greeting(tuple(buf[2:end])), end


def encode_greeting(methods: tuple[int, ...] | list[int]) -> bytes:
    """Client side: offer *methods* (1..255 of them)."""
    if not 1 <= len(methods) <= 255:
        raise ValueError("a greeting offers 1..255 methods")
    return bytes([VERSION, len(methods), *methods])


def encode_method_selection(method: int) -> bytes:
    """Server side: VER | METHOD."""
    return bytes([VERSION, method])


def parse_method_selection(buf: bytes | bytearray) -> tuple[int, int] | None:
    """Client side: the method the server chose."""
    if len(buf) < 2:
        return None
    if buf[0] != VERSION:
        raise BadVersion(f"server answered with version {buf[0]}")
    return buf[1], 2


# --- request (client -> server) and reply (server -> client) ------------------------------


@attrs.frozen
class Request:
    """VER | CMD | RSV | ATYP | DST.ADDR | DST.PORT."""

    command: Command
    address: Address


def parse_request(
    buf: bytes | bytearray, commands: frozenset[Command] = RFC_COMMANDS
) -> tuple[Request, int] | None:
    """Parse a request. The command is checked last, so that REP 07 only answers requests
    that are otherwise well formed; a command outside *commands* (by default RFC 1928's
    three; pass :data:`ALL_COMMANDS` for Tor's RESOLVE and RESOLVE_PTR too) is not
    supported."""
    if len(buf) < 4:
        if buf and buf[0] != VERSION:
            raise MalformedMessage(f"request with version {buf[0]}")
        return None
    version, command, rsv = buf[0], buf[1], buf[2]
    if version != VERSION:
        raise MalformedMessage(f"request with version {version}")
    if rsv != 0:
        raise MalformedMessage(f"RSV must be 0, got {rsv}")
    parsed = parse_address(buf, 3)
    if parsed is None:
        return None
    address, end = parsed
    if command not in commands:
        raise CommandNotSupported(f"unknown command {command:#04x}")
    return Request(Command(command), address), end


def encode_request(command: Command, address: Address) -> bytes:
    """Client side: a request for *command* to *address*."""
    return bytes([VERSION, command, 0]) + address.encode()


_UNSPECIFIED = Address("0.0.0.0", 0, AddressType.IPV4)


def encode_reply(reply: Reply, address: Address | None = None) -> bytes:
    """Server side: VER | REP | RSV | ATYP | BND.ADDR | BND.PORT (0.0.0.0:0 when unknown)."""
    return bytes([VERSION, reply, 0]) + (address or _UNSPECIFIED).encode()


@attrs.frozen
class ServerReply:
    """A reply as the client sees it."""

    reply: int
    address: Address


def parse_reply(buf: bytes | bytearray) -> tuple[ServerReply, int] | None:
    """Client side: parse a reply (either of BIND's two, too)."""
    if len(buf) < 4:
        return None
    if buf[0] != VERSION:
        raise BadVersion(f"reply with version {buf[0]}")
    parsed = parse_address(buf, 3)
    if parsed is None:
        return None
    address, end = parsed
    return ServerReply(buf[1], address), end
