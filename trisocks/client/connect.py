"""CONNECT through a SOCKS5 proxy (RFC 1928 §4)."""

from __future__ import annotations

from trisocks.client.handshake import Auth, ProxyAddress, closed_on_error, connect_control
from trisocks.client.stream import SocksStream
from trisocks.protocol import Address, Command

__all__ = ["open_socks_stream"]


async def open_socks_stream(
    proxy: ProxyAddress, host: str, port: int, *, auth: Auth = None
) -> SocksStream:
    """Open a TCP connection to *host*:*port* through *proxy*.

    A domain *host* is sent as it is (ATYP 3) and resolved by the proxy. Bound the whole
    operation with a trio cancel scope (``trio.fail_after``) if it must not take long.

    Args:
        proxy: the SOCKS5 server, ``(host, port)`` or ``"host:port"``.
        host: an IPv4/IPv6 literal or a domain name.
        port: the target port.
        auth: ``(username, password)`` for RFC 1929, or ``None``.
    Returns:
        The stream; the caller closes it (``async with stream:``).
    Raises:
        OSError: the proxy cannot be reached.
        SocksAuthError: no acceptable method, or wrong credentials.
        SocksReplyError: the proxy refused or failed; ``.reply`` holds the REP code.
        SocksProtocolError: the proxy broke the protocol.
    """
    control = await connect_control(proxy, auth)
    async with closed_on_error(control.stream):
        bound = await control.request(Command.CONNECT, Address.of(host, port))
    return SocksStream(control.stream, bytes(control.buffer), (bound.host, bound.port))
