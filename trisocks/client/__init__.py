"""A trio SOCKS5 client: CONNECT, BIND and UDP ASSOCIATE through any RFC 1928 proxy.

Built on the sans-IO core in :mod:`trisocks.protocol`. Timeouts are the caller's trio cancel
scopes; nothing here takes a timeout argument. See ``docs/client.md``.
"""

from trisocks.client.bind import SocksBinding, open_socks_bind
from trisocks.client.connect import open_socks_stream
from trisocks.client.errors import (
    SocksAuthError,
    SocksClientError,
    SocksProtocolError,
    SocksReplyError,
)
from trisocks.client.gssapi import GSSAPI
from trisocks.client.stream import SocksStream
from trisocks.client.udp import SocksDatagramSocket, open_socks_udp

__all__ = [
    "GSSAPI",
    "SocksAuthError",
    "SocksBinding",
    "SocksClientError",
    "SocksDatagramSocket",
    "SocksProtocolError",
    "SocksReplyError",
    "SocksStream",
    "open_socks_bind",
    "open_socks_stream",
    "open_socks_udp",
]
