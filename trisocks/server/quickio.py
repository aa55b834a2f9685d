"""Handshake-sized socket I/O without a trip through the scheduler per call.

A trio socket operation ends with a checkpoint even when the kernel answered at once (so that
every call looks as if it blocked). For the few tiny messages of a handshake that means one
pass of the scheduler per message, which is most of what a short connection costs the server.
These helpers make the plain system call first and wait (a checkpoint, where cancellation and
timeouts apply) only when the kernel says the socket is not ready. A GSSAPI-wrapped stream
goes through its own methods.
"""

from __future__ import annotations

import os

import trio
from trio.lowlevel import wait_readable

__all__ = ["receive", "send"]


async def receive(stream: trio.abc.ReceiveStream, max_bytes: int) -> bytes | bytearray:
    """What the peer has sent, up to *max_bytes*; ``b""`` at EOF.

    Raises:
        OSError: the connection failed (reset, ...).
    """
    if not isinstance(stream, trio.SocketStream):
        return await stream.receive_some(max_bytes)
    fd = stream.socket.fileno()
    while True:
        try:
            return os.read(fd, max_bytes)
        except BlockingIOError:
            await wait_readable(fd)


async def send(stream: trio.abc.SendStream, data: bytes) -> None:
    """Send all of *data*.

    Raises:
        OSError, trio.BrokenResourceError: the connection failed.
    """
    if not isinstance(stream, trio.SocketStream):
        await stream.send_all(data)
        return
    try:
        sent = os.write(stream.socket.fileno(), data)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        await stream.send_all(memoryview(data)[sent:])
