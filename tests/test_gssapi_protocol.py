"""RFC 1961 framing in the sans-IO core: wire examples, then hypothesis properties (round
trip, any split, trailing bytes left alone, random bytes raise only SocksError)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trisocks.protocol import SocksError
from trisocks.protocol.gssapi import (
    ABORT,
    MAX_TOKEN,
    Frame,
    GssAborted,
    GssProtocolError,
    MessageType,
    ProtectionLevel,
    acceptable_level,
    choose_level,
    encode_frame,
    encode_protection_level,
    parse_datagram,
    parse_frame,
    parse_protection_level,
)

CONTEXT, PROTECTION, DATA = MessageType.CONTEXT, MessageType.PROTECTION, MessageType.ENCAPSULATED
INTEG, CONF, SEL = ProtectionLevel


def test_frame_wire() -> None:
    wire = b"\x01\x01\x00\x03tok"  # ver mtyp=context len=3 token
    assert parse_frame(wire, CONTEXT) == (Frame(CONTEXT, b"tok"), 7)
    assert all(parse_frame(wire[:n], CONTEXT) is None for n in range(len(wire)))
    assert encode_frame(CONTEXT, b"tok") == wire


def test_empty_token_and_maximum_token() -> None:
    assert parse_frame(b"\x01\x03\x00\x00", DATA) == (Frame(DATA, b""), 4)
    big = encode_frame(DATA, bytes(MAX_TOKEN))
    assert big[2:4] == b"\xff\xff" and parse_frame(big, DATA) == (Frame(DATA, bytes(MAX_TOKEN)),
                                                                  MAX_TOKEN + 4)
    with pytest.raises(ValueError, match="16-bit"):
        encode_frame(DATA, bytes(MAX_TOKEN + 1))


@pytest.mark.parametrize("expect", list(MessageType))
def test_abort_is_recognised_at_every_step(expect: MessageType) -> None:
    assert ABORT == b"\x01\xff"
    with pytest.raises(GssAborted):
        parse_frame(ABORT, expect)


@pytest.mark.parametrize(
    ("wire", "expect", "message"),
    [
        (b"\x05\x01\x00\x00", CONTEXT, "version 5"),  # a SOCKS request where a frame belongs
        (b"\x01\x04\x00\x00", DATA, "message type 4"),  # unknown mtyp
        (b"\x01\x01\x00\x00", DATA, "expected 3"),  # context token after negotiation
        (b"\x01\x03\x00\x00", PROTECTION, "expected 2"),  # data before the level is agreed
    ],
)
def test_frame_violations(wire: bytes, expect: MessageType, message: str) -> None:
    with pytest.raises(GssProtocolError, match=message) as info:
        parse_frame(wire, expect)
    assert info.value.reply is None  # there is no SOCKS reply to give: abort and close


def test_protection_level_octet() -> None:
    assert encode_protection_level(CONF) == b"\x02"
    assert parse_protection_level(b"\x03") is SEL
    for bad in (b"", b"\x00", b"\x04", b"\x01\x01"):
        with pytest.raises(GssProtocolError):
            parse_protection_level(bad)


@pytest.mark.parametrize(
    ("requested", "accepted", "chosen"),
    [
        (INTEG, {INTEG, CONF}, INTEG),
        (CONF, {INTEG, CONF}, CONF),
        (SEL, {INTEG, CONF}, CONF),  # selective: the closest the server accepts
        (SEL, {INTEG}, INTEG),
        (INTEG, {CONF}, CONF),  # the server insists on more; the client may abort
        (CONF, {INTEG}, INTEG),  # ... or on less, which a client asking for 2 must refuse
    ],
)
def test_choose_level(
    requested: ProtectionLevel, accepted: set[ProtectionLevel], chosen: ProtectionLevel
) -> None:
    assert choose_level(requested, accepted) is chosen


@pytest.mark.parametrize(
    ("requested", "chosen", "ok"),
    [
        (INTEG, INTEG, True), (INTEG, CONF, True), (CONF, CONF, True),
        (CONF, INTEG, False),  # a downgrade: the client closes
        (SEL, INTEG, True), (SEL, CONF, True), (SEL, SEL, False), (INTEG, SEL, False),
    ],
)
def test_acceptable_level(requested: ProtectionLevel, chosen: ProtectionLevel, ok: bool) -> None:
    assert acceptable_level(requested, chosen) is ok


def test_datagram_is_exactly_one_frame() -> None:
    assert parse_datagram(b"\x01\x03\x00\x02hi") == b"hi"
    for bad in (b"\x01\x03\x00\x02h", b"\x01\x03\x00\x02hi!", b"\x01\x01\x00\x00", b""):
        with pytest.raises(GssProtocolError):
            parse_datagram(bad)
    with pytest.raises(GssAborted):
        parse_datagram(ABORT)


# --- hypothesis -----------------------------------------------------------------------------


@given(st.sampled_from(list(MessageType)), st.binary(max_size=600), st.binary(max_size=20),
       st.data())
def test_frame_round_trip_any_split_and_trailing_bytes(
    mtyp: MessageType, token: bytes, trailing: bytes, data: st.DataObject
) -> None:
    wire = encode_frame(mtyp, token)
    assert parse_frame(wire + trailing, mtyp) == (Frame(mtyp, token), len(wire))
    cut = data.draw(st.integers(0, len(wire) - 1))
    assert parse_frame(wire[:cut], mtyp) is None


@given(st.binary(max_size=300), st.sampled_from(list(MessageType)))
def test_random_bytes_raise_only_protocol_errors(junk: bytes, expect: MessageType) -> None:
    for parse in (lambda: parse_frame(junk, expect), lambda: parse_datagram(junk),
                  lambda: parse_protection_level(junk)):
        try:
            parse()
        except SocksError:
            pass


@given(st.sampled_from(list(ProtectionLevel)),
       st.sets(st.sampled_from([INTEG, CONF]), min_size=1))
def test_chosen_level_is_always_one_the_server_accepts(
    requested: ProtectionLevel, accepted: set[ProtectionLevel]
) -> None:
    chosen = choose_level(requested, accepted)
    assert chosen in accepted and (requested not in accepted or chosen is requested)
