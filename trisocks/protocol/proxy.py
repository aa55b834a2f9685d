"""Sans-IO PROXY protocol, versions 1 (text) and 2 (binary), as HAProxy specifies it
(``doc/proxy-protocol.txt``).

A load balancer in TCP mode opens its own connection to us, so the peer address we see is the
balancer's. With ``send-proxy``/``send-proxy-v2`` it first sends one header naming the real
client; we read that header and nothing else, then the SOCKS greeting follows.

Rules:

1. :func:`parse_proxy_header` returns ``None`` while the buffer is a strict prefix of a valid
   header, ``(header, bytes_used)`` once one is complete, and raises only
   :class:`ProxyProtocolError`. Bytes after the header are never looked at.
2. A listener that expects the header refuses anything else (spec §2: "the receiver MUST NOT
   try to guess"): a connection without one is closed, never served with the balancer's
   address.
3. ``LOCAL`` (v2) and ``UNKNOWN`` (v1) headers, and address families we do not relay (UNIX,
   UNSPEC), carry no usable client: ``source`` is ``None`` and the socket's own peer stands.
"""

from __future__ import annotations

import ipaddress
import struct

import attrs

__all__ = [
    "MAX_HEADER",
    "V2_SIGNATURE",
    "ProxyHeader",
    "ProxyProtocolError",
    "encode_v1",
    "encode_v2",
    "parse_proxy_header",
]

V1_PREFIX = b"PROXY "
V1_MAX = 107
"""Spec §2.1: the longest v1 line ("PROXY UNKNOWN" + two IPv6 addresses), CRLF included."""
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16
"""Signature (12), version/command, family/transport, length (2)."""
MAX_HEADER = 4096
"""The most we buffer for a v2 header. Addresses take at most 216 bytes (UNIX); the rest is
TLVs, which HAProxy keeps small; a peer announcing more is refused rather than buffered."""

_V2_ADDRESS_BYTES = {0x1: 12, 0x2: 36, 0x3: 216}
"""By address family (spec §2.2): INET, INET6, UNIX."""
_LOCAL, _PROXY = 0x0, 0x1
_STREAM = 0x1


class ProxyProtocolError(Exception):
    """The bytes are not a valid PROXY protocol header; the connection must be closed."""


Address = tuple[str, int]


@attrs.frozen
class ProxyHeader:
    """What the balancer tells us about the connection it relays."""

    version: int
    """1 or 2."""
    source: Address | None
    """The real client's ``(ip, port)``; ``None`` for LOCAL/UNKNOWN (use the socket's peer)."""
    destination: Address | None
    """The address the client connected to on the balancer."""


def parse_proxy_header(buf: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
    """Parse a v1 or v2 header at the front of *buf*; ``None`` means it is still incomplete.

    Raises:
        ProxyProtocolError: *buf* cannot start a valid header.
    """
    head = bytes(buf[: len(V2_SIGNATURE)])
    if V2_SIGNATURE.startswith(head):  # also the empty buffer
        return _parse_v2(buf) if len(head) == len(V2_SIGNATURE) else None
    if V1_PREFIX.startswith(head[: len(V1_PREFIX)]):
        return _parse_v1(buf) if len(head) >= len(V1_PREFIX) else None
    raise ProxyProtocolError("no PROXY protocol header (expected 'PROXY ' or the v2 signature)")


def _parse_v1(buf: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
    end = bytes(buf[:V1_MAX]).find(b"\r\n")
    if end < 0:
        if len(buf) >= V1_MAX:
            raise ProxyProtocolError(f"v1 header longer than {V1_MAX} bytes")
        return None
    try:
        fields = bytes(buf[:end]).decode("ascii").split(" ")
    except UnicodeDecodeError:
        raise ProxyProtocolError("v1 header is not ASCII") from None
    used = end + 2
    if len(fields) >= 2 and fields[1] == "UNKNOWN":  # spec: the rest of the line is ignored
        return ProxyHeader(1, None, None), used
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"v1 header has an unknown shape: {' '.join(fields)!r}")
    _, proto, src, dst, sport, dport = fields
    version = 4 if proto == "TCP4" else 6
    source = (_v1_ip(src, version), _v1_port(sport))
    destination = (_v1_ip(dst, version), _v1_port(dport))
    return ProxyHeader(1, source, destination), used


def _v1_ip(text: str, version: int) -> str:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"v1 header: {text!r} is not an IP address") from None
    if ip.version != version:
        raise ProxyProtocolError(f"v1 header: {text!r} is not an IPv{version} address")
    return str(ip)


def _v1_port(text: str) -> int:
    # Spec §2.1: decimal, 0..65535, no leading zeros (so one port has one spelling).
    if not text.isdigit() or not text.isascii() or (text != "0" and text.startswith("0")):
        raise ProxyProtocolError(f"v1 header: bad port {text!r}")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError(f"v1 header: port {port} is out of range")
    return port


def _parse_v2(buf: bytes | bytearray) -> tuple[ProxyHeader, int] | None:
    if len(buf) < V2_FIXED:
        return None
    ver_cmd, fam, length = struct.unpack_from("!BBH", buf, len(V2_SIGNATURE))
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"v2 header: version {ver_cmd >> 4}, expected 2")
    command = ver_cmd & 0xF
    if command not in (_LOCAL, _PROXY):
        raise ProxyProtocolError(f"v2 header: unknown command {command}")
    if V2_FIXED + length > MAX_HEADER:
        raise ProxyProtocolError(f"v2 header announces {length} bytes; at most "
                                 f"{MAX_HEADER - V2_FIXED} are accepted")
    family, transport = fam >> 4, fam & 0xF
    if family > 0x3 or transport > 0x2:
        raise ProxyProtocolError(f"v2 header: unknown family/transport byte {fam:#04x}")
    needed = _V2_ADDRESS_BYTES.get(family, 0)
    if length < needed:
        raise ProxyProtocolError(f"v2 header: {length} bytes cannot hold the addresses")
    used = V2_FIXED + length
    if len(buf) < used:
        return None
    if command == _LOCAL or transport != _STREAM or family not in (0x1, 0x2):
        return ProxyHeader(2, None, None), used  # rule 3: health checks, UNIX, UDP, UNSPEC
    size = 4 if family == 0x1 else 16
    body = bytes(buf[V2_FIXED : V2_FIXED + needed])
    src, dst = (str(ipaddress.ip_address(body[i * size : (i + 1) * size])) for i in (0, 1))
    sport, dport = struct.unpack_from("!HH", body, 2 * size)
    return ProxyHeader(2, (src, sport), (dst, dport)), used


def encode_v1(source: Address, destination: Address) -> bytes:
    """A v1 header (what HAProxy's ``send-proxy`` sends); both addresses of one family."""
    proto = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def encode_v2(source: Address | None, destination: Address | None = None,
              tlvs: bytes = b"") -> bytes:
    """A v2 header (``send-proxy-v2``); ``source=None`` gives a LOCAL header."""
    if source is None or destination is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20 | _LOCAL, 0, len(tlvs)) + tlvs
    family = 0x2 if ":" in source[0] else 0x1
    addresses = b"".join(ipaddress.ip_address(a[0]).packed for a in (source, destination))
    body = addresses + struct.pack("!HH", source[1], destination[1]) + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x20 | _PROXY, family << 4 | _STREAM,
                                      len(body)) + body
