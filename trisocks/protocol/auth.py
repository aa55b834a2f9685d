"""RFC 1929 username/password sub-negotiation.

Lengths are byte counts; names and passwords are UTF-8 on our side and kept as bytes here, so
that nothing is lost or re-encoded between the wire and the password check.
"""

from __future__ import annotations

import attrs

from trisocks.protocol.errors import AuthFailed

__all__ = [
    "AuthRequest",
    "encode_auth_request",
    "encode_auth_response",
    "parse_auth_request",
    "parse_auth_response",
]

SUBNEGOTIATION_VERSION = 1


@attrs.frozen(repr=False)
class AuthRequest:
    """VER=1 | ULEN | UNAME | PLEN | PASSWD."""

    username: bytes
    password: bytes

    def __repr__(self) -> str:  # never show a password, not even in a traceback
        return f"AuthRequest(username={self.username!r}, password=<{len(self.password)} bytes>)"


def parse_auth_request(buf: bytes | bytearray) -> tuple[AuthRequest, int] | None:
    """Parse the sub-negotiation request. Empty names or passwords are not allowed (RFC 1929:
    ULEN and PLEN are 1..255)."""
    if not buf:
        return None
    if buf[0] != SUBNEGOTIATION_VERSION:
        raise AuthFailed(f"sub-negotiation version {buf[0]}, expected 1")
    if len(buf) < 2:
        return None
    ulen = buf[1]
    if ulen == 0:
        raise AuthFailed("empty username")
    plen_at = 2 + ulen
    if len(buf) <= plen_at:
        return None
    plen = buf[plen_at]
    if plen == 0:
        raise AuthFailed("empty password")
    end = plen_at + 1 + plen
    if len(buf) < end:
        return None
    return AuthRequest(bytes(buf[2:plen_at]), bytes(buf[plen_at + 1 : end])), end


def encode_auth_request(username: bytes | str, password: bytes | str) -> bytes:
    """Client side. *username* and *password* are encoded as UTF-8; each must be 1..255 bytes."""
    user = username.encode() if isinstance(username, str) else username
    pw = password.encode() if isinstance(password, str) else password
    if not (1 <= len(user) <= 255 and 1 <= len(pw) <= 255):
        raise ValueError("username and password must each be 1..255 bytes")
    return bytes([SUBNEGOTIATION_VERSION, len(user)]) + user + bytes([len(pw)]) + pw


def encode_auth_response(success: bool) -> bytes:
    """Server side: VER=1 | STATUS (0 success, 1 failure)."""
    return bytes([SUBNEGOTIATION_VERSION, 0 if success else 1])


def parse_auth_response(buf: bytes | bytearray) -> tuple[bool, int] | None:
    """Client side: True when STATUS is 0."""
    if len(buf) < 2:
        return None
    if buf[0] != SUBNEGOTIATION_VERSION:
        raise AuthFailed(f"sub-negotiation response with version {buf[0]}")
    return buf[1] == 0, 2
