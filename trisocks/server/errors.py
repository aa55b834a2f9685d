"""Turning I/O failures into RFC 1928 reply codes, in one place."""

from __future__ import annotations

import errno
import socket

import trio

from trisocks.protocol import Reply

__all__ = ["UpstreamReply", "reply_for"]


class UpstreamReply(OSError):
    """A ``via`` parent's answer for the target (a SOCKS REP, or an HTTP status mapped to
    one): what the client gets (:mod:`trisocks.server.parents`)."""

    def __init__(self, reply: int, message: str) -> None:
        super().__init__(message)
        self.reply = reply

_ERRNO_REPLY = {
    errno.ECONNREFUSED: Reply.CONNECTION_REFUSED,
    errno.ENETUNREACH: Reply.NETWORK_UNREACHABLE,
    errno.ENETDOWN: Reply.NETWORK_UNREACHABLE,
    errno.EHOSTUNREACH: Reply.HOST_UNREACHABLE,
    errno.EHOSTDOWN: Reply.HOST_UNREACHABLE,
    errno.EADDRNOTAVAIL: Reply.HOST_UNREACHABLE,
    errno.ETIMEDOUT: Reply.TTL_EXPIRED,
    errno.EAFNOSUPPORT: Reply.ADDRESS_TYPE_NOT_SUPPORTED,
    errno.EACCES: Reply.NOT_ALLOWED,
    errno.EPERM: Reply.NOT_ALLOWED,
}


def _causes(exc: BaseException) -> list[BaseException]:
    """``trio.open_tcp_stream`` raises a summary OSError (errno None) whose ``__cause__`` is an
    ExceptionGroup of the per-address errors; look through it."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        return list(cause.exceptions)
    return [exc]


def reply_for(exc: BaseException) -> Reply:
    """The reply a client should get for a failed outbound connect or bind."""
    if isinstance(exc, UpstreamReply):
        try:
            return Reply(exc.reply)
        except ValueError:
            return Reply.GENERAL_FAILURE
    if isinstance(exc, trio.TooSlowError):
        return Reply.TTL_EXPIRED
    if isinstance(exc, socket.gaierror):
        return Reply.HOST_UNREACHABLE  # the name does not resolve
    replies = [
        _ERRNO_REPLY[c.errno]
        for c in _causes(exc)
        if isinstance(c, OSError) and c.errno in _ERRNO_REPLY
    ]
    if not replies:
        if any(isinstance(c, socket.gaierror) for c in _causes(exc)):
            return Reply.HOST_UNREACHABLE
        return Reply.GENERAL_FAILURE
    # Several addresses failed differently: a refusal says the most about the target.
    for preferred in (Reply.CONNECTION_REFUSED, Reply.TTL_EXPIRED, Reply.HOST_UNREACHABLE):
        if preferred in replies:
            return preferred
    return replies[0]
