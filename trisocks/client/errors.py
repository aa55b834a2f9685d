"""What can go wrong talking to a SOCKS5 proxy, as exceptions a caller can tell apart.

Failing to reach the proxy at all is not here: that stays the ``OSError`` trio raises.
"""

from __future__ import annotations

from trisocks.protocol import Reply

__all__ = ["SocksAuthError", "SocksClientError", "SocksProtocolError", "SocksReplyError"]


class SocksClientError(Exception):
    """Base class of the client's errors."""


class SocksProtocolError(SocksClientError):
    """The proxy broke RFC 1928/1929: a wrong version, a malformed message, a method we did
    not offer, or the connection closed in the middle of the handshake."""


class SocksAuthError(SocksClientError):
    """The proxy accepted none of the offered methods, or rejected the credentials."""


class SocksReplyError(SocksClientError):
    """The proxy answered a request with REP ≠ 0 (RFC 1928 §6)."""

    def __init__(self, reply: Reply | int) -> None:
        self.reply: Reply | int = _known(reply)
        """The REP code; a :class:`Reply` when the RFC defines it, the raw int otherwise."""
        name = self.reply.name if isinstance(self.reply, Reply) else "unassigned"
        super().__init__(f"proxy replied {int(reply):#04x} ({name})")


def _known(reply: int) -> Reply | int:
    try:
        return Reply(reply)
    except ValueError:
        return reply
