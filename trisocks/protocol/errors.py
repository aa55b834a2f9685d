"""Protocol errors. Each one knows what the server should do about it.

Rule: a parser raises only subclasses of :class:`SocksError`. ``reply`` is the REP code to send
before closing (RFC 1928 §6), or ``None`` when the connection must simply be closed (a wrong
VER in the greeting, a broken sub-negotiation).
"""

from __future__ import annotations

import enum


class Reply(enum.IntEnum):
    """REP values of RFC 1928 §6."""

    SUCCEEDED = 0x00
    GENERAL_FAILURE = 0x01
    NOT_ALLOWED = 0x02
    NETWORK_UNREACHABLE = 0x03
    HOST_UNREACHABLE = 0x04
    CONNECTION_REFUSED = 0x05
    TTL_EXPIRED = 0x06
    COMMAND_NOT_SUPPORTED = 0x07
    ADDRESS_TYPE_NOT_SUPPORTED = 0x08


class SocksError(Exception):
    """The peer sent something RFC 1928/1929 does not allow."""

    reply: Reply | None = None
    """The reply to send before closing; ``None``: close without an answer."""


class MalformedMessage(SocksError):
    """A field holds a value the RFC forbids (RSV not 0, empty domain, ...)."""

    reply = Reply.GENERAL_FAILURE


class BadVersion(SocksError):
    """VER is not 5 (RFC 1928 §3): there is no way to answer, so the server just closes."""

    reply = None


class CommandNotSupported(SocksError):
    """CMD is not CONNECT, BIND or UDP ASSOCIATE."""

    reply = Reply.COMMAND_NOT_SUPPORTED


class AddressTypeNotSupported(SocksError):
    """ATYP is not 1, 3 or 4."""

    reply = Reply.ADDRESS_TYPE_NOT_SUPPORTED


class AuthFailed(SocksError):
    """The RFC 1929 sub-negotiation is malformed; answer status 1 and close (RFC 1929 §2)."""

    reply = None
