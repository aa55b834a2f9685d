"""BIND through a SOCKS5 proxy (RFC 1928 §4): the proxy listens, a peer connects to it."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from trisocks.client.handshake import Auth, Control, ProxyAddress, connect_control
from trisocks.client.stream import SocksStream
from trisocks.protocol import Address, Command

__all__ = ["SocksBinding", "open_socks_bind"]


class SocksBinding:
    """A BIND in progress: the proxy listens at :attr:`address` until a peer connects."""

    def __init__(self, control: Control, address: Address) -> None:
        self._control = control
        self._accepted = False
        self.address: tuple[str, int] = (address.host, address.port)
        """BND.ADDR/BND.PORT of the first reply: where the peer must connect."""

    async def accept(self) -> tuple[SocksStream, tuple[str, int]]:
        """Wait for the second reply: the peer has connected to the proxy.

        Wait as long as the proxy does, or bound it with a trio cancel scope.

        Returns:
            The stream to the peer (closed with the ``open_socks_bind`` block) and the peer's
            address as the proxy saw it.
        Raises:
            SocksReplyError: the proxy gave up (REP 06 when its accept timed out).
            SocksProtocolError: the proxy broke the protocol.
            RuntimeError: called a second time.
        """
        if self._accepted:
            raise RuntimeError("a BIND accepts one peer; accept() was already called")
        self._accepted = True
        peer = await self._control.read_reply()
        stream = SocksStream(self._control.stream, bytes(self._control.buffer), self.address)
        self._control.buffer.clear()
        return stream, (peer.host, peer.port)


@contextlib.asynccontextmanager
async def open_socks_bind(
    proxy: ProxyAddress, host: str, port: int, *, auth: Auth = None
) -> AsyncIterator[SocksBinding]:
    """Ask *proxy* to listen for one incoming connection from *host* (the peer you expect).

    Usage::

        async with open_socks_bind(proxy, "203.0.113.5", 0) as binding:
            tell_the_peer(binding.address)          # e.g. an FTP PORT command
            stream, peer = await binding.accept()

    Args:
        proxy: the SOCKS5 server, ``(host, port)`` or ``"host:port"``.
        host: the peer's expected address (``"0.0.0.0"`` for anyone; a proxy may use it to
            refuse other peers, as trisocks does).
        port: the peer's expected port (``0`` if unknown).
        auth: ``(username, password)`` for RFC 1929, or ``None``.
    Returns:
        A :class:`SocksBinding`. Leaving the block closes the connection to the proxy, and
        with it the accepted stream.
    Raises:
        OSError: the proxy cannot be reached.
        SocksAuthError: no acceptable method, or wrong credentials.
        SocksReplyError: the proxy refused to listen; ``.reply`` holds the REP code.
        SocksProtocolError: the proxy broke the protocol.
    """
    control = await connect_control(proxy, auth)
    async with control.stream:
        listening = await control.request(Command.BIND, Address.of(host, port))
        yield SocksBinding(control, listening)
