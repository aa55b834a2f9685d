"""The text log cannot be forged (issue 12): every client-supplied value of the access line is
one field, quoted and escaped when it needs to be, and reads back exactly; any message is one
line of printable characters. The JSON format is exact already (json.dumps)."""

from __future__ import annotations

import io
import logging
import re
import types
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import Proxy, connect_request, eventually, read_reply, socks_handshake
from tests.session_support import session_from_text
from trisocks.logs import TextFormatter, escape_unprintable, quote
from trisocks.passwords import hash_password
from trisocks.server.context import Stats
from trisocks.server.session import _log_session

# --- a reader for the text format: what a log parser would do ------------------------------

_FIELD = re.compile(r'(?:([a-z]+)=)?("(?:[^"\\]|\\.)*"|[^ "]+)(?: |$)')
_UNESCAPE = re.compile(r'\\(x[0-9a-f]{2}|u[0-9a-f]{4}|U[0-9a-f]{8}|.)')
_SIMPLE = {"\\": "\\", '"': '"', "n": "\n", "r": "\r", "t": "\t"}


def unquote(token: str) -> str | None:
    if token == "-":
        return None
    if not token.startswith('"'):
        return token

    def one(match: re.Match[str]) -> str:
        code = match[1]
        return _SIMPLE[code] if len(code) == 1 else chr(int(code[1:], 16))

    return _UNESCAPE.sub(one, token[1:-1])


def parse_fields(text: str) -> list[tuple[str | None, str | None]]:
    """``[(key or None, value)]``; the whole of *text* must be fields."""
    fields, pos = [], 0
    while pos < len(text):
        match = _FIELD.match(text, pos)
        assert match is not None, f"not a field at {pos}: {text[pos:]!r}"
        fields.append((match[1], unquote(match[2])))
        pos = match.end()
    return fields


def access_line(**values: Any) -> str:
    """The text access line for a session with *values*, through the real formatter."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(TextFormatter())
    logger = logging.Logger("trisocks.access")
    logger.addHandler(handler)
    session = session_from_text("ab12cd34", values.pop("client", "127.0.0.1:5000"), **values)
    ctx = types.SimpleNamespace(stats=Stats(started_at=0.0), access_log=logger)
    _log_session(ctx, session, 0.25)  # type: ignore[arg-type]
    return out.getvalue()


def message_of(line: str) -> str:
    head, sep, message = line.partition(" trisocks.access: ")
    assert sep and re.fullmatch(r"\S+ \S+ INFO", head), line
    return message


# --- quote ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "written"), [
    (None, "-"),
    ("alice", "alice"),
    ("example.com:443", "example.com:443"),
    ("[::1]:1080", "[::1]:1080"),
    ("-", '"-"'),  # not the placeholder for "none"
    ("", '""'),
    ("bob smith", '"bob smith"'),
    ("a=b", '"a=b"'),
    ('say "hi"', '"say \\"hi\\""'),
    ("back\\slash", '"back\\\\slash"'),
    ("x\r\ny", '"x\\r\\ny"'),
    ("tab\there", '"tab\\there"'),
    ("\x1b[2Jansi", '"\\x1b[2Jansi"'),
    ("nul\x00", '"nul\\x00"'),
    ("del\x7f", '"del\\x7f"'),
    ("c1\x85\x9b", '"c1\\x85\\x9b"'),
    ("nbsp\xa0", '"nbsp\\xa0"'),
    ("line\u2028para\u2029", '"line\\u2028para\\u2029"'),
    ("bidi\u202eevil\u2066", '"bidi\\u202eevil\\u2066"'),
    ("zw\u200bj\u200d", '"zw\\u200bj\\u200d"'),
    ("bom\ufeff", '"bom\\ufeff"'),
    ("filler\u3164", '"filler\\u3164"'),
    ("lone\udcff", '"lone\\udcff"'),
    ("tag\U000e0041", '"tag\\U000e0041"'),
    ("josé", '"josé"'),  # printable non-ASCII stays readable, inside quotes
    ("例え.jp:80", '"例え.jp:80"'),
])
def test_quote_table(value: str | None, written: str) -> None:
    assert quote(value) == written
    assert unquote(written) == value


def test_escape_unprintable_keeps_printable_text_and_escapes_the_rest() -> None:
    assert escape_unprintable('plain "text" \\ stays') == 'plain "text" \\ stays'
    assert escape_unprintable("two\nlines\r\x1b[0m") == "two\\nlines\\r\\x1b[0m"


# --- the access line ------------------------------------------------------------------------


FORGERY = "x.invalid:80 reply=00\n2026-01-01 00:00:00,000 INFO trisocks.access: 10.0.0.1:1 u=r:80"
"""A target whose name (ATYP 03: any bytes) would end the line and forge another one."""


@pytest.mark.parametrize(("field", "value"), [
    ("target", FORGERY),
    ("target", "evil\r\x1b[1A\x1b[2K.example:443"),
    ("user", "bob reply=00 rule=admin"),
    ("user", "-"),
    ("rule", "my rule"),
    ("close_reason", "connect failed: [Errno -2] \"bad\"\nname"),
])
def test_access_line_is_one_line_and_reads_back(field: str, value: str) -> None:
    line = access_line(command="CONNECT", **{field: value})
    assert line.endswith("\n") and line.count("\n") == 1
    message = message_of(line[:-1])
    fields = parse_fields(message)
    keyed = {key: v for key, v in fields if key}
    positional = [v for key, v in fields if not key]
    assert positional[0] == "127.0.0.1:5000" and positional[1] == "CONNECT"
    got = {"target": positional[2], "user": keyed["user"], "rule": keyed["rule"],
           "close_reason": keyed.get("reason")}
    assert got[field] == value
    assert [k for k, _ in fields] == [None, "user", None, None, "reply", "rule", "up", "down",
                                      "duration", "protocol",
                                      *(["reason"] if "reason" in keyed else [])]


client_text = st.text(st.characters(blacklist_categories=()), max_size=40)


targets = st.builds("{}:{}".format, client_text, st.integers(0, 65535))
"""``name:port`` with any name a client could send."""


@settings(max_examples=300, deadline=None)
@given(user=client_text | st.none(), target=targets | st.none(),
       rule=client_text | st.none(), reason=client_text | st.none())
def test_any_client_value_gives_one_printable_line_that_parses_back(
    user: str | None, target: str | None, rule: str | None, reason: str | None
) -> None:
    line = access_line(user=user, command="CONNECT", target=target, rule=rule,
                       close_reason=reason, reply=0)
    assert line.endswith("\n")
    line = line[:-1]
    assert line.isprintable()  # no control, format, separator or surrogate character
    fields = parse_fields(message_of(line))
    keyed = {key: v for key, v in fields if key}
    positional = [v for key, v in fields if not key]
    assert positional == ["127.0.0.1:5000", "CONNECT", target]
    assert keyed["user"] == user and keyed["rule"] == rule and keyed["reply"] == "00"
    assert keyed.get("reason") == (reason or None)  # no reason field for none (or empty)


@given(st.text(st.characters(blacklist_categories=()), max_size=60))
def test_any_message_is_one_printable_line(text: str) -> None:
    record = logging.LogRecord("trisocks.session", logging.INFO, __file__, 1, "refused: %s",
                               (text,), None)
    line = TextFormatter().format(record)
    assert "\n" not in line and line.isprintable()


# --- end to end: a real session -------------------------------------------------------------


async def test_forged_target_and_spaced_user_through_a_real_proxy(
    start_proxy: Any, store: Any, loopback_dns: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trisocks")
    store.add_user("bob smith", hash_password(b"pw"))
    proxy: Proxy = await start_proxy()
    host = "forged.invalid\r\n2026-01-01 INFO trisocks.access: 1.2.3.4:5 user=root\x1b[2K"
    with trio.fail_after(10):
        stream = await proxy.open_raw()
        await socks_handshake(stream, "bob smith", "pw")
        await stream.send_all(connect_request(host, 80))
        rep, _, _ = await read_reply(stream)
        await stream.aclose()
        await eventually(lambda: any(r.name == "trisocks.access" for r in caplog.records))
    assert rep != 0
    (record,) = [r for r in caplog.records if r.name == "trisocks.access"]
    line = TextFormatter().format(record)
    assert "\n" not in line and line.isprintable()
    fields = parse_fields(message_of(line))
    keyed = {key: v for key, v in fields if key}
    assert keyed["user"] == "bob smith"
    assert [v for key, v in fields if not key][2] == f"{host}:80"
    assert keyed["reason"] is not None and keyed["reason"].startswith("connect failed")
    assert record.session["target"] == f"{host}:80"  # type: ignore[attr-defined]
