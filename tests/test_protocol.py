"""The sans-IO core: every parser rule, table-driven, plus hypothesis properties.

Properties checked for each parser:
- round trip: encode then parse gives the message back, using exactly the encoded bytes;
- any split: every strict prefix of a valid message parses as "need more" (None);
- trailing bytes are left alone (pipelined clients);
- random bytes never raise anything but SocksError.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trisocks.protocol import (
    ALL_COMMANDS,
    Address,
    AddressType,
    AddressTypeNotSupported,
    AuthFailed,
    BadVersion,
    Command,
    CommandNotSupported,
    MalformedMessage,
    Reassembler,
    Reply,
    SocksError,
    encode_auth_request,
    encode_auth_response,
    encode_greeting,
    encode_method_selection,
    encode_reply,
    encode_request,
    encode_udp_header,
    fragment,
    parse_auth_request,
    parse_auth_response,
    parse_greeting,
    parse_method_selection,
    parse_reply,
    parse_request,
    parse_udp_header,
)

# --- table-driven wire examples -----------------------------------------------------------


def test_greeting_wire() -> None:
    wire = b"\x05\x02\x00\x02"  # ver nmethods [none, user/pass]
    greeting, used = parse_greeting(wire)
    assert greeting.methods == (0, 2) and used == 4
    assert all(parse_greeting(wire[:n]) is None for n in range(len(wire)))


def test_greeting_with_no_methods_is_legal() -> None:
    assert parse_greeting(b"\x05\x00") is not None
    assert parse_greeting(b"\x05\x00")[0].methods == ()


def test_greeting_wrong_version_closes_without_reply() -> None:
    with pytest.raises(BadVersion) as info:
        parse_greeting(b"\x04\x01\x00")
    assert info.value.reply is None


def test_method_selection() -> None:
    assert encode_method_selection(0xFF) == b"\x05\xff"
    assert parse_method_selection(b"\x05\x02") == (2, 2)


@pytest.mark.parametrize(
    ("wire", "command", "host", "port", "atyp"),
    [
        (b"\x05\x01\x00\x01\x7f\x00\x00\x01\x00\x50", Command.CONNECT, "127.0.0.1", 80,
         AddressType.IPV4),  # ver cmd rsv IPV4 127.0.0.1 :80
        (b"\x05\x02\x00\x04" + bytes(15) + b"\x01\x1f\x90", Command.BIND, "::1", 8080,
         AddressType.IPV6),  # ver cmd rsv IPV6 ::1 :8080
        (b"\x05\x03\x00\x03\x0bexample.com\x01\xbb", Command.UDP_ASSOCIATE, "example.com", 443,
         AddressType.DOMAIN),  # ver cmd rsv DOMAIN len name :443
    ],
)
def test_request_wire(
    wire: bytes, command: Command, host: str, port: int, atyp: AddressType
) -> None:
    request, used = parse_request(wire + b"payload")
    assert used == len(wire)
    assert request.command == command
    assert request.address == Address(host, port, atyp)
    assert all(parse_request(wire[:n]) is None for n in range(len(wire)))
    assert encode_request(command, request.address) == wire


@pytest.mark.parametrize(
    ("wire", "error", "reply"),
    [
        (b"\x05\x09\x00\x01\x7f\x00\x00\x01\x00\x50", CommandNotSupported,
         Reply.COMMAND_NOT_SUPPORTED),
        (b"\x05\x01\x00\x05\x7f\x00\x00\x01\x00\x50", AddressTypeNotSupported,
         Reply.ADDRESS_TYPE_NOT_SUPPORTED),
        (b"\x05\x01\x01\x01\x7f\x00\x00\x01\x00\x50", MalformedMessage, Reply.GENERAL_FAILURE),
        (b"\x05\x01\x00\x03\x00\x00\x50", MalformedMessage, Reply.GENERAL_FAILURE),
        (b"\x05\x01\x00\x03\x03a\x00b\x00\x50", MalformedMessage, Reply.GENERAL_FAILURE),
        (b"\x05\x01\x00\x03\x02\xff\xfe\x00\x50", MalformedMessage, Reply.GENERAL_FAILURE),
        (b"\x04\x01\x00\x01\x7f\x00\x00\x01\x00\x50", MalformedMessage, Reply.GENERAL_FAILURE),
    ],
    ids=["cmd-09", "atyp-05", "rsv-1", "empty-domain", "nul-in-domain", "not-utf8", "ver-4"],
)
def test_request_violations_know_their_reply(
    wire: bytes, error: type[SocksError], reply: Reply
) -> None:
    with pytest.raises(error) as info:
        parse_request(wire)
    assert info.value.reply == reply


def test_reply_encodes_bound_address_and_defaults_to_zeros() -> None:
    assert encode_reply(Reply.SUCCEEDED, Address.of("10.1.2.3", 1080)) == (
        b"\x05\x00\x00\x01\x0a\x01\x02\x03\x04\x38"
    )
    assert encode_reply(Reply.CONNECTION_REFUSED) == b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00"
    parsed, used = parse_reply(b"\x05\x00\x00\x04" + bytes(15) + b"\x01\x00\x35")
    assert parsed.reply == 0 and parsed.address == Address("::1", 53, AddressType.IPV6)
    assert used == 22


def test_auth_wire() -> None:
    wire = b"\x01\x05alice\x06secret"  # ver ulen name plen password
    request, used = parse_auth_request(wire)
    assert (request.username, request.password, used) == (b"alice", b"secret", len(wire))
    assert "secret" not in repr(request)
    assert all(parse_auth_request(wire[:n]) is None for n in range(len(wire)))
    assert encode_auth_request("alice", "secret") == wire
    assert encode_auth_response(True) == b"\x01\x00"
    assert encode_auth_response(False) == b"\x01\x01"
    assert parse_auth_response(b"\x01\x00") == (True, 2)
    assert parse_auth_response(b"\x01\x01") == (False, 2)


@pytest.mark.parametrize(
    "wire",
    [b"\x05\x05alice\x06secret", b"\x01\x00\x06secret", b"\x01\x05alice\x00"],
    ids=["subnegotiation-ver-5", "empty-name", "empty-password"],
)
def test_auth_violations(wire: bytes) -> None:
    with pytest.raises(AuthFailed):
        parse_auth_request(wire)


def test_auth_lengths_are_bytes_not_characters() -> None:
    wire = encode_auth_request("jürgen", "pässwörd")
    assert wire[1] == len("jürgen".encode())
    request, _ = parse_auth_request(wire)
    assert request.username.decode() == "jürgen"


def test_udp_header_wire() -> None:
    wire = b"\x00\x00\x00\x01\x7f\x00\x00\x01\x00\x35" + b"dns"  # rsv frag IPV4 addr :53 DATA
    header = parse_udp_header(wire)
    assert header.frag == 0 and header.address == Address.of("127.0.0.1", 53)
    assert wire[header.offset:] == b"dns"
    assert encode_udp_header(header.address) + b"dns" == wire


@pytest.mark.parametrize(
    "wire",
    [b"\x00\x01\x00\x01\x7f\x00\x00\x01\x00\x35", b"\x00\x00\x00\x01\x7f\x00",
     b"\x00\x00\x80\x01\x7f\x00\x00\x01\x00\x35", b"\x00\x00"],
    ids=["rsv", "truncated", "frag-80", "short"],
)
def test_udp_header_violations(wire: bytes) -> None:
    with pytest.raises(MalformedMessage):
        parse_udp_header(wire)


# --- reassembly -----------------------------------------------------------------------------

TARGET = Address.of("127.0.0.1", 9)


def feed_all(r: Reassembler, datagrams: list[bytes], now: float = 0.0) -> list[object]:
    out = []
    for d in datagrams:
        h = parse_udp_header(d)
        out.append(r.feed(h, d[h.offset:], now))
    return out


def test_fragments_reassemble_in_order() -> None:
    r = Reassembler()
    pieces = fragment(TARGET, b"abcdefghij", 3)
    assert [parse_udp_header(p).frag for p in pieces] == [1, 2, 3, 0x84]
    out = feed_all(r, pieces)
    assert out[:-1] == [None, None, None]
    assert out[-1] == (TARGET, b"abcdefghij")
    assert r.completed == 1 and r.pending == 0 and r.deadline is None


def test_lower_position_reinitialises_the_queue() -> None:
    r = Reassembler()
    p = fragment(TARGET, b"aabbcc", 2)
    # 1, 2, then 1 again: the queue restarts from the second 1, so 1,2,3 completes once.
    out = feed_all(r, [p[0], p[1], p[0], p[1], p[2]])
    assert out == [None, None, None, None, (TARGET, b"aabbcc")]
    assert r.dropped == 1


def test_reordered_sequence_is_dropped_not_misassembled() -> None:
    r = Reassembler()
    p = fragment(TARGET, b"aabbcc", 2)
    assert feed_all(r, [p[1], p[0], p[2]]) == [None, None, None]
    assert r.completed == 0


def test_gap_before_last_fragment_delivers_nothing() -> None:
    r = Reassembler()
    p = fragment(TARGET, b"aabbcc", 2)
    assert feed_all(r, [p[0], p[2]]) == [None, None]
    assert r.completed == 0 and r.dropped == 1


def test_standalone_datagram_passes_and_resets_queue() -> None:
    r = Reassembler()
    p = fragment(TARGET, b"aabbcc", 2)
    standalone = encode_udp_header(TARGET) + b"solo"
    assert feed_all(r, [p[0], standalone]) == [None, (TARGET, b"solo")]
    assert r.pending == 0


def test_timer_expiry_drops_the_queue() -> None:
    r = Reassembler(timeout=5.0)
    p = fragment(TARGET, b"aabbcc", 2)
    feed_all(r, p[:2], now=100.0)
    assert r.deadline == 105.0
    assert not r.expire(104.999)
    assert r.expire(105.0)
    assert r.pending == 0
    # the last fragment alone, after expiry, completes nothing
    assert feed_all(r, [p[2]], now=105.5) == [None]


def test_timer_must_be_at_least_five_seconds() -> None:
    with pytest.raises(ValueError, match="5 seconds"):
        Reassembler(timeout=4.9)


def test_queue_bounds() -> None:
    r = Reassembler(max_bytes=4)
    p = fragment(TARGET, b"aabbcc", 2)
    assert feed_all(r, p) == [None, None, None]
    assert r.dropped == 1 and r.completed == 0


# --- hypothesis -----------------------------------------------------------------------------

ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
domain = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1
).filter(lambda s: len(s.encode()) <= 255 and not _is_ip(s))


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False


addresses = st.one_of(
    st.builds(Address, ipv4, st.integers(0, 65535), st.just(AddressType.IPV4)),
    st.builds(Address, ipv6, st.integers(0, 65535), st.just(AddressType.IPV6)),
    st.builds(Address, domain, st.integers(0, 65535), st.just(AddressType.DOMAIN)),
)


@given(st.sampled_from(list(Command)), addresses, st.binary(max_size=20), st.data())
def test_request_round_trip_and_any_split(
    command: Command, address: Address, trailing: bytes, data: st.DataObject
) -> None:
    wire = encode_request(command, address)
    request, used = parse_request(wire + trailing, ALL_COMMANDS)
    assert (request.command, request.address, used) == (command, address, len(wire))
    cut = data.draw(st.integers(0, len(wire) - 1))
    assert parse_request(wire[:cut], ALL_COMMANDS) is None


@given(st.integers(0, 255), addresses)
def test_reply_round_trip(rep: int, address: Address) -> None:
    wire = bytes([5, rep, 0]) + address.encode()
    parsed, used = parse_reply(wire)
    assert (parsed.reply, parsed.address, used) == (rep, address, len(wire))


@given(st.lists(st.integers(0, 255), min_size=1, max_size=255), st.data())
def test_greeting_round_trip_and_any_split(methods: list[int], data: st.DataObject) -> None:
    wire = encode_greeting(methods)
    assert parse_greeting(wire) == (parse_greeting(wire)[0], len(wire))
    assert parse_greeting(wire)[0].methods == tuple(methods)
    assert parse_greeting(wire[: data.draw(st.integers(0, len(wire) - 1))]) is None


@given(st.binary(min_size=1, max_size=255), st.binary(min_size=1, max_size=255), st.data())
def test_auth_round_trip_and_any_split(user: bytes, pw: bytes, data: st.DataObject) -> None:
    wire = encode_auth_request(user, pw)
    request, used = parse_auth_request(wire)
    assert (request.username, request.password, used) == (user, pw, len(wire))
    assert parse_auth_request(wire[: data.draw(st.integers(0, len(wire) - 1))]) is None


@given(addresses, st.binary(max_size=64))
def test_udp_round_trip(address: Address, payload: bytes) -> None:
    wire = encode_udp_header(address) + payload
    header = parse_udp_header(wire)
    assert header.address == address and wire[header.offset:] == payload


@given(addresses, st.binary(min_size=2, max_size=600), st.integers(1, 64))
def test_fragment_then_reassemble(address: Address, payload: bytes, size: int) -> None:
    if -(-len(payload) // size) > 127:
        size = -(-len(payload) // 127)
    r = Reassembler()
    out = [x for x in feed_all(r, fragment(address, payload, size)) if x is not None]
    assert out == [(address, payload)]


PARSERS = [parse_greeting, parse_request, parse_auth_request, parse_reply,
           parse_method_selection, parse_auth_response]


def outcome(parse: object, data: bytes) -> str:
    """What a parser did with *data*: "incomplete", "parsed" or "error" (a SocksError).
    Anything else it raises fails the test."""
    try:
        result = parse(data)  # type: ignore[operator]
    except SocksError:
        return "error"
    if result is None:
        return "incomplete"
    assert isinstance(result, tuple) or hasattr(result, "offset")
    if isinstance(result, tuple):
        assert 0 < result[1] <= len(data)
    return "parsed"


@given(st.binary(max_size=300))
def test_random_bytes_raise_only_protocol_errors(junk: bytes) -> None:
    for parse in [*PARSERS, parse_udp_header]:
        assert outcome(parse, junk) in ("incomplete", "parsed", "error")


@given(st.binary(max_size=300))
def test_random_domain_bytes(tail: bytes) -> None:
    assert outcome(parse_request, b"\x05\x01\x00\x03" + tail) in ("incomplete", "parsed", "error")
