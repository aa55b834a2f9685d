"""The sans-IO PROXY protocol parser: wire examples from the spec, then hypothesis properties
(round trip, any split is "need more", trailing bytes untouched, junk raises only
ProxyProtocolError)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trisocks.protocol.proxy import (
    MAX_HEADER,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    encode_v1,
    encode_v2,
    parse_proxy_header,
)

V2_TCP4 = (
    V2_SIGNATURE
    + b"\x21"  # version 2, command PROXY
    + b"\x11"  # AF_INET, STREAM
    + b"\x00\x0c"  # 12 address bytes follow
    + b"\xc0\x00\x02\x01"  # src 192.0.2.1
    + b"\x7f\x00\x00\x01"  # dst 127.0.0.1
    + b"\xd4\x31"  # sport 54321
    + b"\x04\x38"  # dport 1080
)


@pytest.mark.parametrize(
    ("wire", "header"),
    [
        (b"PROXY TCP4 192.0.2.1 127.0.0.1 54321 1080\r\n",
         ProxyHeader(1, ("192.0.2.1", 54321), ("127.0.0.1", 1080))),
        (b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n",
         ProxyHeader(1, ("2001:db8::1", 65535), ("::1", 0))),
        (b"PROXY UNKNOWN\r\n", ProxyHeader(1, None, None)),
        (b"PROXY UNKNOWN ffff:: ffff:: 1 2\r\n", ProxyHeader(1, None, None)),
        (V2_TCP4, ProxyHeader(2, ("192.0.2.1", 54321), ("127.0.0.1", 1080))),
        (V2_SIGNATURE + b"\x20\x00\x00\x00", ProxyHeader(2, None, None)),  # LOCAL: health check
        (V2_SIGNATURE + b"\x21\x12\x00\x0c" + bytes(12), ProxyHeader(2, None, None)),  # UDP
        (V2_SIGNATURE + b"\x21\x31\x00\xd8" + bytes(216), ProxyHeader(2, None, None)),  # UNIX
    ],
)
def test_wire_examples(wire: bytes, header: ProxyHeader) -> None:
    assert parse_proxy_header(wire + b"\x05\x01\x00") == (header, len(wire))
    assert all(parse_proxy_header(wire[:n]) is None for n in range(len(wire)))


def test_v2_tlvs_are_skipped() -> None:
    wire = encode_v2(("10.0.0.1", 1), ("10.0.0.2", 2), tlvs=b"\x04\x00\x01\x00")  # NOOP TLV
    assert parse_proxy_header(wire) == (ProxyHeader(2, ("10.0.0.1", 1), ("10.0.0.2", 2)),
                                        len(wire))


@pytest.mark.parametrize(
    ("wire", "message"),
    [
        (b"\x05\x01\x00", "no PROXY protocol header"),  # a SOCKS greeting straight away
        (b"GET / HTTP/1.1\r\n", "no PROXY protocol header"),
        (b"PROXY TCP4 192.0.2.1 127.0.0.1 54321\r\n", "unknown shape"),
        (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", "unknown shape"),
        (b"PROXY TCP4 ::1 ::1 1 2\r\n", "not an IPv4"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "not an IPv6"),
        (b"PROXY TCP4 1.2.3 1.2.3.4 1 2\r\n", "not an IP address"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 01 2\r\n", "bad port"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 65536\r\n", "out of range"),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n", "bad port"),
        (b"PROXY \xff\r\n", "not ASCII"),
        (b"PROXY " + b"x" * 200, "longer than 107"),
        (V2_SIGNATURE + b"\x11\x11\x00\x0c", "version 1, expected 2"),
        (V2_SIGNATURE + b"\x22\x11\x00\x0c", "unknown command 2"),
        (V2_SIGNATURE + b"\x21\x41\x00\x0c", "unknown family"),
        (V2_SIGNATURE + b"\x21\x11\x00\x08", "cannot hold the addresses"),
        (V2_SIGNATURE + b"\x21\x11\xff\xff", "at most"),
    ],
)
def test_refusals(wire: bytes, message: str) -> None:
    with pytest.raises(ProxyProtocolError, match=message):
        parse_proxy_header(wire)


def test_incomplete_v2_within_the_limit_waits() -> None:
    wire = V2_SIGNATURE + b"\x21\x11" + (MAX_HEADER - 16).to_bytes(2, "big")
    assert parse_proxy_header(wire) is None


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@given(st.one_of(st.tuples(ipv4, ipv4), st.tuples(ipv6, ipv6)), ports, ports,
       st.booleans(), st.binary(max_size=20))
def test_round_trip_any_split_and_trailing_bytes(
    ips: tuple[str, str], sport: int, dport: int, v2: bool, trailing: bytes
) -> None:
    source, destination = (ips[0], sport), (ips[1], dport)
    wire = encode_v2(source, destination) if v2 else encode_v1(source, destination)
    header, used = parse_proxy_header(wire + trailing) or (None, 0)
    assert header == ProxyHeader(2 if v2 else 1, source, destination)
    assert used == len(wire)
    assert all(parse_proxy_header(wire[:n]) is None for n in range(len(wire)))


@given(st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=120).map(lambda t: b"PROXY " + t),
    st.binary(max_size=60).map(lambda t: V2_SIGNATURE + t),
))
def test_junk_raises_only_proxy_protocol_error(wire: bytes) -> None:
    try:
        result = parse_proxy_header(wire)
    except ProxyProtocolError:
        return
    if result is not None:
        assert 0 < result[1] <= len(wire)
