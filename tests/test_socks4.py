"""SOCKS4/4a and Tor's RESOLVE/RESOLVE_PTR through a real trisocks, by raw bytes and by real
clients (curl, ncat, tor-resolve), on one port beside SOCKS5; first-byte detection."""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from prometheus_client import generate_latest

from tests.conftest import (
    HttpOrigin,
    Proxy,
    connect_request,
    echo_round_trip,
    eventually,
    open_connect,
    read_reply,
    receive_exactly,
    socks_handshake,
)
from tests.conftest import assert_closed as assert_closed_by_peer
from tests.session_support import session_from_text
from tests.test_bind import connect_from, wait_sessions_ended
from tests.test_interop_tools import program, run_tool
from trisocks.admin.metrics import metrics_registry
from trisocks.admin.shapes import session_json
from trisocks.config import ConfigError, build_config, load_file
from trisocks.fleet.directory import Directory, Instance
from trisocks.logs import JsonFormatter, TextFormatter
from trisocks.policy import parse_rules
from trisocks.protocol import Address
from trisocks.protocol.socks4 import encode_socks4_request
from trisocks.server.reload import reload_config
from trisocks.store.sql import SqliteDatabase
from trisocks.store.sqlite import Store

OPEN: dict[str, Any] = {"auth": ("none",)}  # SOCKS4 has no password
LOCAL4 = socket.inet_aton("127.0.0.1")


def req4(command: int, host: str, port: int, userid: bytes = b"") -> bytes:
    return encode_socks4_request(command, Address.of(host, port), userid)


async def reply4(stream: trio.SocketStream) -> tuple[int, int, bytes]:
    """One SOCKS4 reply: (CD, DSTPORT, DSTIP)."""
    wire = await receive_exactly(stream, 8)
    assert wire[0] == 0, wire
    return wire[1], int.from_bytes(wire[2:4], "big"), wire[4:]


assert_closed = functools.partial(assert_closed_by_peer, reset_ok=False)
"""The server closes *stream* with an EOF (a reset fails), sending nothing more."""


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "trisocks.access"]


# --- raw bytes --------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["socks4", "socks4a"])
async def test_connect_split_at_every_byte(
    form: str, start_proxy: Callable[..., Any], echo_server: tuple[str, int], loopback_dns: None
) -> None:
    proxy = await start_proxy(**OPEN)
    host = echo_server[0] if form == "socks4" else "echo.trisocks.test"
    wire = req4(1, host, echo_server[1], b"someone")
    for cut in range(1, len(wire)):  # the first byte alone is what detection peeks at
        with trio.fail_after(5):
            stream = await proxy.open_raw()
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await stream.send_all(wire[:cut])
            await stream.send_all(wire[cut:])
            cd, _, _ = await reply4(stream)
            assert cd == 0x5A, cut
            assert await echo_round_trip(stream, b"cut %d" % cut) == b"cut %d" % cut
            await stream.aclose()


async def test_request_and_payload_in_one_segment(
    start_proxy: Callable[..., Any], echo_server: tuple[str, int]
) -> None:
    proxy = await start_proxy(**OPEN)
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        await stream.send_all(req4(1, *echo_server) + b"early bytes")
        cd, port, ip = await reply4(stream)
        assert cd == 0x5A and ip == LOCAL4 and port != 0  # the outbound socket's address
        assert await receive_exactly(stream, 11) == b"early bytes"
        await stream.aclose()


async def test_socks5_and_socks4_share_the_port(
    start_proxy: Callable[..., Any], echo_server: tuple[str, int]
) -> None:
    proxy = await start_proxy(auth=("password", "none"))
    with trio.fail_after(5):
        async with await open_connect(proxy, echo_server) as five:
            assert await echo_round_trip(five, b"five") == b"five"
        four = await proxy.open_raw()
        await four.send_all(req4(1, *echo_server))
        assert (await reply4(four))[0] == 0x5A
        assert await echo_round_trip(four, b"four") == b"four"
        await four.aclose()
    await wait_sessions_ended(proxy)
    assert proxy.ctx.stats.protocols == {"socks5": 1, "socks4": 1}
    text = generate_latest(metrics_registry(proxy.ctx, persisted=[])).decode()
    assert 'trisocks_sessions_by_protocol_total{protocol="socks4"} 1.0' in text


@pytest.mark.parametrize(
    "wire",
    [b"\x04\x03\x00\x50" + LOCAL4 + b"\x00",  # no such command
     b"\x04\x01\x00\x50" + LOCAL4 + b"u" * 300,  # endless USERID
     b"\x04\x01\x00\x50\x00\x00\x00\x01\x00" + b"d" * 300,  # endless 4a domain
     b"\x04\x01\x00\x50\x00\x00\x00\x01\x00\x00",  # empty domain
     b"\x04\xf0\x00\x00" + LOCAL4 + b"\x00"],  # RESOLVE without a name
    ids=["command", "userid", "domain", "empty-domain", "resolve-ip"],
)
async def test_malformed_request_refused_with_5b(
    start_proxy: Callable[..., Any], wire: bytes
) -> None:
    proxy = await start_proxy(**OPEN)
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        await stream.send_all(wire)
        assert await reply4(stream) == (0x5B, 0, b"\0\0\0\0")
        await assert_closed(stream)
    await wait_sessions_ended(proxy)
    assert proxy.ctx.stats.handshake_failures["malformed"] == 1


async def test_refused_where_a_password_is_required(
    proxy: Proxy, echo_server: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trisocks")
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        await stream.send_all(req4(1, *echo_server, b"alice"))
        assert (await reply4(stream))[0] == 0x5B
        await assert_closed(stream)
        await eventually(lambda: access_records(caplog))
    assert proxy.ctx.stats.handshake_failures["auth_required"] == 1
    (record,) = access_records(caplog)
    assert record.session["protocol"] == "socks4"  # type: ignore[attr-defined]
    assert record.session["reply"] == 2  # type: ignore[attr-defined]


async def test_rules_apply_and_userid_is_logged_escaped(
    start_proxy: Callable[..., Any], echo_server: tuple[str, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trisocks")
    rules = parse_rules([{"id": "no-echo", "action": "deny", "ports": [echo_server[1]]}])
    proxy = await start_proxy(**OPEN, rules=rules)
    userid = "mallory\r\n2026 INFO trisocks.access: forged"
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        await stream.send_all(req4(1, *echo_server, userid.encode()))
        assert (await reply4(stream))[0] == 0x5B
        await assert_closed(stream)
        await eventually(lambda: access_records(caplog))
    (record,) = access_records(caplog)
    line = TextFormatter().format(record)
    assert "\n" not in line and line.isprintable()
    assert " protocol=socks4 " in line and "rule=no-echo" in line and "reply=02" in line
    assert ' userid="mallory\\r\\n2026 INFO trisocks.access: forged"' in line
    data = json.loads(JsonFormatter().format(record))
    assert data["event"] == "session" and data["userid"] == userid
    assert data["protocol"] == "socks4" and data["tls"] is False


async def test_connect_failure_is_5b(start_proxy: Callable[..., Any]) -> None:
    proxy = await start_proxy(**OPEN)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        await stream.send_all(req4(1, "127.0.0.1", closed_port))
        assert (await reply4(stream))[0] == 0x5B
        await assert_closed(stream)
    await wait_sessions_ended(proxy)
    assert proxy.ctx.stats.replies[5] == 1  # the outcome, as RFC 1928 names it: refused


async def test_bind_two_replies_and_relay(start_proxy: Callable[..., Any]) -> None:
    proxy = await start_proxy(**OPEN)
    seen: list[dict[str, Any]] = []
    proxy.ctx.registry.add_listener(
        lambda event, s: seen.append(session_json(s.view())) if event == "request" else None)
    with trio.fail_after(10):
        stream = await proxy.open_raw()
        await stream.send_all(req4(2, "127.0.0.1", 0))
        cd, port, ip = await reply4(stream)
        assert (cd, ip) == (0x5A, LOCAL4) and port != 0  # where the listener is
        peer = await connect_from("127.0.0.1", port)
        cd, peer_port, ip = await reply4(stream)
        assert (cd, ip) == (0x5A, LOCAL4) and peer_port == peer.socket.getsockname()[1]
        await peer.send_all(b"from the peer")
        assert await receive_exactly(stream, 13) == b"from the peer"
        await stream.send_all(b"to the peer")
        assert await receive_exactly(peer, 11) == b"to the peer"
        await peer.aclose()
        await stream.aclose()
    assert seen[0]["protocol"] == "socks4" and seen[0]["command"] == "BIND"
    assert seen[0]["tls"] is False


@pytest.mark.parametrize(
    "first", [b"\x00", b"\x16\x03\x01", b"\xff", b"1234", b"\x06\x01\x00"],
    ids=["nul", "tls-hello", "ff", "digit", "version-6"],
)
async def test_unknown_first_byte_closed_and_counted(
    proxy: Proxy, first: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trisocks")
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        await stream.send_all(first)
        await assert_closed(stream)
        await eventually(lambda: access_records(caplog))
    assert proxy.ctx.stats.handshake_failures["unknown_protocol"] == 1


async def test_eof_before_the_first_byte(proxy: Proxy) -> None:
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        await stream.send_eof()
        await assert_closed(stream)
    await wait_sessions_ended(proxy)
    assert proxy.ctx.stats.handshake_failures["eof"] == 1


async def test_silent_client_times_out_in_detection(start_proxy: Callable[..., Any]) -> None:
    proxy = await start_proxy(handshake_timeout=0.2)
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        await assert_closed(stream)  # closed by the server, not by us
    assert proxy.ctx.stats.handshake_failures["timeout"] == 1


# --- Tor's RESOLVE and RESOLVE_PTR -----------------------------------------------------------


def name_request(command: int, name: str) -> bytes:
    raw = name.encode()
    return bytes([5, command, 0, 3, len(raw)]) + raw + b"\x00\x00"


async def socks5_resolve(proxy: Proxy, request: bytes) -> tuple[int, bytes]:
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        await socks_handshake(stream, None)
        await stream.send_all(request)
        rep, address, _ = await read_reply(stream)
        await assert_closed(stream)
        return rep, address


@pytest.mark.parametrize(
    ("request_", "rep", "address"),
    [(name_request(0xF0, "host.trisocks.test"), 0, b"\x01" + LOCAL4),
     (name_request(0xF0, "127.1"), 0, b"\x01" + LOCAL4),  # a numeric name is its address
     (name_request(0xF0, "nowhere.invalid"), 4, b"\x01\0\0\0\0"),
     (connect_request("127.0.0.1", 0, cmd=0xF1), 0, b"\x03\x09localhost"),
     (name_request(0xF1, "host.trisocks.test"), 8, b"\x01\0\0\0\0")],  # PTR takes an address
    ids=["resolve", "numeric", "nxdomain", "ptr", "ptr-of-name"],
)
async def test_socks5_resolve(
    start_proxy: Callable[..., Any], loopback_dns: None, request_: bytes, rep: int,
    address: bytes,
) -> None:
    proxy = await start_proxy(**OPEN)
    assert await socks5_resolve(proxy, request_) == (rep, address)
    await wait_sessions_ended(proxy)


async def test_socks5_resolve_split_at_every_byte(
    start_proxy: Callable[..., Any], loopback_dns: None
) -> None:
    proxy = await start_proxy(**OPEN)
    wire = b"\x05\x01\x00" + name_request(0xF0, "host.trisocks.test")
    for cut in range(1, len(wire)):
        with trio.fail_after(5):
            stream = await proxy.open_raw()
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await stream.send_all(wire[:cut])
            await stream.send_all(wire[cut:])
            assert await receive_exactly(stream, 2) == b"\x05\x00"
            assert await read_reply(stream) == (0, b"\x01" + LOCAL4, 0), cut
            await assert_closed(stream)


async def test_proxy_header_then_socks4_in_one_segment(
    start_proxy: Callable[..., Any], echo_server: tuple[str, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trisocks")
    proxy = await start_proxy(**OPEN, proxy_protocol=True, rules=())  # a remote client
    header = b"PROXY TCP4 198.51.100.7 127.0.0.1 4567 1080\r\n"
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        await stream.send_all(header + req4(1, *echo_server, b"behind-lb"))
        assert (await reply4(stream))[0] == 0x5A
        assert await echo_round_trip(stream, b"through the balancer") == b"through the balancer"
        await stream.aclose()
        await eventually(lambda: access_records(caplog))
    (record,) = access_records(caplog)
    session = record.session  # type: ignore[attr-defined]
    assert session["client"] == "198.51.100.7:4567" and session["protocol"] == "socks4"
    assert session["userid"] == "behind-lb"


@pytest.mark.parametrize(
    "rule",
    [{"id": "r", "action": "deny", "to": ["127.0.0.0/8"]},  # the name's address is denied
     {"id": "r", "action": "deny", "commands": ["resolve"]}],
    ids=["denied-address", "denied-command"],
)
async def test_resolve_judged_by_rules(
    start_proxy: Callable[..., Any], loopback_dns: None, rule: dict[str, Any]
) -> None:
    proxy = await start_proxy(**OPEN, rules=parse_rules([rule]))
    assert await socks5_resolve(proxy, name_request(0xF0, "host.trisocks.test")) == (
        2, b"\x01\0\0\0\0")
    await wait_sessions_ended(proxy)
    assert proxy.ctx.stats.denied["r"] == 1


async def test_socks4a_resolve(start_proxy: Callable[..., Any], loopback_dns: None) -> None:
    proxy = await start_proxy(**OPEN)
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        await stream.send_all(req4(0xF0, "host.trisocks.test", 0))
        assert await reply4(stream) == (0x5A, 0, LOCAL4)
        await assert_closed(stream)


# --- real clients -----------------------------------------------------------------------------


@pytest.mark.interop
@pytest.mark.parametrize("flag", ["--socks4", "--socks4a"])
async def test_curl(
    flag: str, start_proxy: Callable[..., Any], http_origin: HttpOrigin, loopback_dns: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trisocks")
    proxy = await start_proxy(**OPEN)
    host = "127.0.0.1" if flag == "--socks4" else "origin.trisocks.test"  # 4a: the proxy resolves
    url = http_origin.url.replace("127.0.0.1", host)
    body = await run_tool([program("curl"), "-sS", "--fail", flag, f"127.0.0.1:{proxy.port}",
                           "-U", "curl-user:", url])
    assert hashlib.sha256(body).digest() == hashlib.sha256(http_origin.body).digest()
    await eventually(lambda: access_records(caplog))
    (record,) = access_records(caplog)
    session = record.session  # type: ignore[attr-defined]
    assert session["protocol"] == "socks4" and session["target"] == f"{host}:{http_origin.port}"
    assert session["userid"] == "curl-user" and session["bytes_down"] >= len(body)


@pytest.mark.interop
async def test_ncat_socks4(start_proxy: Callable[..., Any], echo_server: tuple[str, int]) -> None:
    proxy = await start_proxy(**OPEN)
    out = await run_tool(
        [program("ncat"), "--proxy", f"127.0.0.1:{proxy.port}", "--proxy-type", "socks4",
         "-w", "5", echo_server[0], str(echo_server[1])],
        stdin=b"ping through ncat socks4\n",
    )
    assert out == b"ping through ncat socks4\n"
    await wait_sessions_ended(proxy)
    assert proxy.ctx.stats.protocols["socks4"] == 1


@pytest.mark.interop
@pytest.mark.parametrize(
    ("args", "answer"),
    [(["-5", "host.trisocks.test"], "127.0.0.1"),
     (["-4", "host.trisocks.test"], "127.0.0.1"),
     (["-x", "127.0.0.1"], "localhost")],
    ids=["socks5", "socks4a", "ptr"],
)
async def test_tor_resolve(
    args: list[str], answer: str, start_proxy: Callable[..., Any], loopback_dns: None
) -> None:
    proxy = await start_proxy(**OPEN)
    out = await run_tool([program("tor-resolve"), *args, f"127.0.0.1:{proxy.port}"])
    assert out.decode().strip() == answer
    await wait_sessions_ended(proxy)
    assert sum(proxy.ctx.stats.protocols.values()) == 1


# --- configuration ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "result"),
    [("socks5", ("socks5",)), ("http, SOCKS4", ("http", "socks4")),
     (["socks5", "socks4", "http"], ("socks5", "socks4", "http")),
     ("socks6", "unknown protocol 'socks6'"), ("socks5,socks5", "listed twice"),
     ([], "expected a list")],
)
def test_protocols_key(raw: Any, result: tuple[str, ...] | str) -> None:
    if isinstance(result, tuple):
        assert build_config({"protocols": raw}, {}).protocols == result
        assert build_config({}, {"protocols": raw}).protocols == result  # the flag's value
    else:
        with pytest.raises(ConfigError, match=result):
            build_config({"protocols": raw}, {})


def test_check_validates_protocols(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('protocols = ["socks5", "gopher"]\n')
    result = subprocess.run(
        [sys.executable, "-m", "trisocks", "check", "--config", str(bad),
         "--db", str(tmp_path / "db")], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "protocols: unknown protocol 'gopher'" in result.stderr


@pytest.mark.parametrize(("auth", "warned"), [(("password",), True), (("none",), False)])
async def test_serve_warns_when_socks4_cannot_be_served(
    start_proxy: Callable[..., Any], caplog: pytest.LogCaptureFixture, auth: tuple[str, ...],
    warned: bool,
) -> None:
    caplog.set_level(logging.INFO, logger="trisocks")
    await start_proxy(auth=auth)
    warnings = [r for r in caplog.records
                if r.levelno == logging.WARNING and "socks4" in r.getMessage()]
    assert len(warnings) == int(warned)
    caplog.clear()
    await start_proxy(auth=auth, protocols=("socks5",))
    assert not [r for r in caplog.records if "socks4" in r.getMessage()]


def test_fleet_directory_carries_protocol_and_tls(tmp_path: Path) -> None:
    Store(tmp_path / "s.db").close()
    db = SqliteDatabase(tmp_path / "s.db")
    try:
        directory = Directory(db)
        a = Instance("host/1", "trisocks/host/1")
        session = session_from_text("ab12cd34", "192.0.2.1:4000", protocol="socks4", tls=True)
        directory.publish(a, 0.0, [session.view()], now=100.0)
        (remote,) = directory.sessions(101.0, besides="x")
        assert (remote.protocol, remote.tls) == ("socks4", True)
        assert session_json(remote)["protocol"] == "socks4"
    finally:
        db.close()


async def test_reload_changes_protocols(
    start_proxy: Callable[..., Any], echo_server: tuple[str, int], tmp_path: Path
) -> None:
    proxy = await start_proxy(**OPEN)
    config_file = tmp_path / "trisocks.toml"
    config_file.write_text('auth = ["none"]\nprotocols = ["socks5"]\n')
    proxy.ctx.load_config = lambda: build_config(
        load_file(config_file), {"db": str(proxy.ctx.config.db)})
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        await stream.send_all(req4(1, *echo_server))
        assert (await reply4(stream))[0] == 0x5A
        await stream.aclose()
        reload_config(proxy.ctx)
        stream = await proxy.open_raw()
        await stream.send_all(req4(1, *echo_server))
        await assert_closed(stream)  # SOCKS4 is off now: no answer
    assert proxy.ctx.stats.handshake_failures["unknown_protocol"] == 1
