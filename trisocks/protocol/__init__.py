"""Sans-IO SOCKS5: RFC 1928 messages, RFC 1929 sub-negotiation and the UDP header.

Nothing in this package touches a socket, a clock or trio. Parsers take a buffer and return
``None`` ("need more bytes") or ``(message, bytes_used)``, or raise a :class:`SocksError` that
knows what to answer. Encoders return ``bytes``.
"""

from trisocks.protocol.auth import (
    AuthRequest,
    encode_auth_request,
    encode_auth_response,
    parse_auth_request,
    parse_auth_response,
)
from trisocks.protocol.errors import (
    AddressTypeNotSupported,
    AuthFailed,
    BadVersion,
    CommandNotSupported,
    MalformedMessage,
    SocksError,
)
from trisocks.protocol.socks5 import (
    ALL_COMMANDS,
    RFC_COMMANDS,
    Address,
    AddressType,
    Command,
    Greeting,
    Method,
    Reply,
    Request,
    ServerReply,
    encode_greeting,
    encode_method_selection,
    encode_reply,
    encode_request,
    parse_greeting,
    parse_method_selection,
    parse_reply,
    parse_request,
)
from trisocks.protocol.udp import (
    Reassembler,
    UdpHeader,
    encode_udp_header,
    fragment,
    parse_udp_header,
)

__all__ = [
    "ALL_COMMANDS",
    "RFC_COMMANDS",
    "Address",
    "AddressType",
    "AddressTypeNotSupported",
    "AuthFailed",
    "AuthRequest",
    "BadVersion",
    "Command",
    "CommandNotSupported",
    "Greeting",
    "MalformedMessage",
    "Method",
    "Reassembler",
    "Reply",
    "Request",
    "ServerReply",
    "SocksError",
    "UdpHeader",
    "encode_auth_request",
    "encode_auth_response",
    "encode_greeting",
    "encode_method_selection",
    "encode_reply",
    "encode_request",
    "encode_udp_header",
    "fragment",
    "parse_auth_request",
    "parse_auth_response",
    "parse_greeting",
    "parse_method_selection",
    "parse_reply",
    "parse_request",
    "parse_udp_header",
]
