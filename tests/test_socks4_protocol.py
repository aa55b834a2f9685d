"""Sans-IO SOCKS4/4a, Tor's RESOLVE commands in the SOCKS5 parser, and first-byte detection."""

from __future__ import annotations

import socket

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from trisocks.protocol import (
    ALL_COMMANDS,
    Address,
    AddressType,
    Command,
    CommandNotSupported,
    SocksError,
    encode_reply,
    encode_request,
    parse_request,
)
from trisocks.protocol.socks4 import (
    GRANTED,
    REJECTED,
    Socks4Error,
    encode_socks4_reply,
    encode_socks4_request,
    parse_socks4_reply,
    parse_socks4_request,
)
from trisocks.server.detect import Prefixed, classify, detect

PORT80 = b"\x00\x50"

# (wire, command, host, port, atyp, userid)
REQUESTS = [
    (b"\x04\x01" + PORT80 + b"\x7f\x00\x00\x01" + b"\x00",
     Command.CONNECT, "127.0.0.1", 80, AddressType.IPV4, b""),
    (b"\x04\x01" + PORT80 + b"\x7f\x00\x00\x01" + b"alice\x00",
     Command.CONNECT, "127.0.0.1", 80, AddressType.IPV4, b"alice"),
    (b"\x04\x02\x1f\x90" + b"\x00\x00\x00\x00" + b"bob\x00",
     Command.BIND, "0.0.0.0", 8080, AddressType.IPV4, b"bob"),
    (b"\x04\x01" + PORT80 + b"\x00\x00\x00\x01" + b"u\x00example.com\x00",  # 4a
     Command.CONNECT, "example.com", 80, AddressType.DOMAIN, b"u"),
    (b"\x04\x02" + PORT80 + b"\x00\x00\x00\xff" + b"\x00h\x00",  # 4a, any x != 0
     Command.BIND, "h", 80, AddressType.DOMAIN, b""),
    (b"\x04\xf0\x00\x00" + b"\x00\x00\x00\x01" + b"\x00torproject.org\x00",  # Tor RESOLVE
     Command.RESOLVE, "torproject.org", 0, AddressType.DOMAIN, b""),
    (b"\x04\x01" + PORT80 + b"\x00\x00\x00\x01" + b"\x00" + "bücher.de".encode() + b"\x00",
     Command.CONNECT, "bücher.de", 80, AddressType.DOMAIN, b""),
    (b"\x04\x01" + PORT80 + b"\x7f\x00\x00\x01" + b"u" * 255 + b"\x00",  # longest USERID
     Command.CONNECT, "127.0.0.1", 80, AddressType.IPV4, b"u" * 255),
]


@pytest.mark.parametrize(("wire", "command", "host", "port", "atyp", "userid"), REQUESTS)
def test_request_parses_and_every_split_is_incomplete(
    wire: bytes, command: Command, host: str, port: int, atyp: AddressType, userid: bytes
) -> None:
    request, used = parse_socks4_request(wire + b"payload")
    assert used == len(wire)
    assert (request.command, request.address, request.userid) == (
        command, Address(host, port, atyp), userid)
    for cut in range(len(wire)):
        assert parse_socks4_request(wire[:cut]) is None, cut


MALFORMED = [
    (b"\x05\x01" + PORT80 + b"\x7f\x00\x00\x01\x00", "version"),
    (b"\x04\x03" + PORT80 + b"\x7f\x00\x00\x01\x00", "command"),  # no UDP in SOCKS4
    (b"\x04\xf1" + PORT80 + b"\x7f\x00\x00\x01\x00", "command"),  # RESOLVE_PTR: SOCKS5 only
    (b"\x04\x01" + PORT80 + b"\x7f\x00\x00\x01" + b"u" * 256, "USERID"),
    (b"\x04\x01" + PORT80 + b"\x00\x00\x00\x01\x00" + b"d" * 256, "domain"),
    (b"\x04\x01" + PORT80 + b"\x00\x00\x00\x01\x00\x00", "empty"),
    (b"\x04\x01" + PORT80 + b"\x00\x00\x00\x01\x00\xff\xfe\x00", "UTF-8"),
    (b"\x04\xf0" + PORT80 + b"\x7f\x00\x00\x01\x00", "RESOLVE"),  # needs the 4a form
]


@pytest.mark.parametrize(("wire", "why"), MALFORMED)
def test_malformed_request_raises(wire: bytes, why: str) -> None:
    with pytest.raises(Socks4Error, match=why):
        parse_socks4_request(wire)


@given(st.binary(max_size=600))
def test_random_bytes_only_raise_socks4_error(data: bytes) -> None:
    for buf in (data, b"\x04" + data):
        try:
            parse_socks4_request(buf)
        except Socks4Error:
            pass


@given(st.sampled_from([Command.CONNECT, Command.BIND]),
       st.ip_addresses(v=4).map(str) | st.from_regex(r"[a-z0-9.-]{1,255}", fullmatch=True),
       st.integers(0, 65535), st.binary(max_size=255).filter(lambda b: 0 not in b))
def test_request_round_trip(command: Command, host: str, port: int, userid: bytes) -> None:
    address = Address.of(host, port)
    if address.atyp == AddressType.IPV4 and host.startswith("0.0.0.") and host != "0.0.0.0":
        return  # that DSTIP is the 4a marker itself
    wire = encode_socks4_request(command, address, userid)
    request, used = parse_socks4_request(wire)
    assert (request.command, request.address, request.userid, used) == (
        command, address, userid, len(wire))


@pytest.mark.parametrize(
    ("granted", "address", "wire"),
    [(True, Address.of("127.0.0.1", 1080), b"\x00\x5a\x04\x38\x7f\x00\x00\x01"),
     (False, None, b"\x00\x5b\x00\x00\x00\x00\x00\x00"),
     (True, Address.of("::1", 9), b"\x00\x5a\x00\x09\x00\x00\x00\x00"),  # IPv6: port only
     (True, Address("h", 9, AddressType.DOMAIN), b"\x00\x5a\x00\x09\x00\x00\x00\x00")],
)
def test_reply_encoding(granted: bool, address: Address | None, wire: bytes) -> None:
    assert encode_socks4_reply(granted, address) == wire
    reply, used = parse_socks4_reply(wire)
    assert (reply.code, used) == (GRANTED if granted else REJECTED, 8)
    for cut in range(8):
        assert parse_socks4_reply(wire[:cut]) is None


# --- Tor's RESOLVE and RESOLVE_PTR in SOCKS5 -------------------------------------------------


@pytest.mark.parametrize(
    ("command", "address"),
    [(Command.RESOLVE, Address.of("torproject.org", 0)),
     (Command.RESOLVE_PTR, Address.of("127.0.0.1", 0)),
     (Command.RESOLVE_PTR, Address.of("::1", 0))],
)
def test_socks5_resolve_commands_only_when_enabled(command: Command, address: Address) -> None:
    wire = encode_request(command, address)
    assert wire[1] in (0xF0, 0xF1)
    with pytest.raises(CommandNotSupported):  # RFC 1928's parser by default
        parse_request(wire)
    request, used = parse_request(wire, ALL_COMMANDS)
    assert (request.command, request.address, used) == (command, address, len(wire))
    for cut in range(len(wire)):
        assert parse_request(wire[:cut], ALL_COMMANDS) is None


def test_resolve_replies_as_tor_defines() -> None:
    assert encode_reply(0, Address.of("93.184.216.34", 0)) == b"\x05\x00\x00\x01]\xb8\xd8\"\x00\x00"
    name = Address("localhost", 0, AddressType.DOMAIN)
    assert encode_reply(0, name) == b"\x05\x00\x00\x03\x09localhost\x00\x00"


@given(st.binary(max_size=300))
def test_random_bytes_with_all_commands_only_raise_socks_errors(data: bytes) -> None:
    try:
        parse_request(data, ALL_COMMANDS)
    except SocksError:
        pass


# --- detection --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "protocol"),
    [(0x05, "socks5"), (0x04, "socks4"), (ord("G"), "http"), (ord("C"), "http"),
     (ord("o"), "http"), (ord("z"), "http"), (ord("A"), "http"), (ord("Z"), "http"),
     (0x00, None), (0x16, None), (ord("@"), None), (ord("["), None), (ord("`"), None),
     (ord("{"), None), (ord("0"), None), (0xFF, None), (0x01, None)],
)
def test_classify(first: int, protocol: str | None) -> None:
    assert classify(first) == protocol


async def test_detect_peeks_a_socket_without_consuming() -> None:
    a, b = trio.socket.socketpair()
    with a, b:
        stream = trio.SocketStream(a)
        await b.send(b"\x05\x01\x00")
        with trio.fail_after(5):
            protocol, conn = await detect(stream)
            assert (protocol, conn) == ("socks5", stream)
            assert await stream.receive_some(10) == b"\x05\x01\x00"  # every byte still there
            await b.send(b"")
            b.shutdown(socket.SHUT_WR)
            with pytest.raises(EOFError):
                await detect(stream)


async def test_detect_wraps_other_streams_in_prefixed() -> None:
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(b"CONNECT x:1 HTTP/1.1\r\n")
    with trio.fail_after(5):
        protocol, conn = await detect(right)
        assert protocol == "http" and isinstance(conn, Prefixed)
        got = b""
        for _ in range(100):  # replayed first, a few bytes at a time
            if got == b"CONNECT x:1 HTTP/1.1\r\nrest":
                break
            if got == b"CONNECT x:1 HTTP/1.1\r\n":
                await left.send_all(b"rest")
            got += await conn.receive_some(5)
        assert got == b"CONNECT x:1 HTTP/1.1\r\nrest"
        await conn.send_all(b"back")
        assert await left.receive_some() == b"back"
        await left.aclose()
        with pytest.raises(EOFError):
            await detect(right)
        await conn.aclose()


async def test_prefixed_passes_attributes_and_eof_through() -> None:
    left, right = trio.testing.memory_stream_pair()
    conn = Prefixed(right, b"xy")
    assert conn.send_stream is right.send_stream  # any attribute of the wrapped stream
    with trio.fail_after(5):
        assert await conn.receive_some() == b"xy"
        await conn.send_eof()
        assert await left.receive_some() == b""
        with pytest.raises(ValueError, match="max_bytes"):
            await Prefixed(right, b"z").receive_some(0)
