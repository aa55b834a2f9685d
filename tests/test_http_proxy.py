"""The HTTP proxy (trisocks/server/http_proxy.py) probed with raw bytes on real sockets."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import (
    BLOB,
    PASSWORD,
    USER,
    HttpOrigin,
    Proxy,
    echo_round_trip,
    eventually,
    receive_all,
)
from tests.http_support import Origin, route_http, start_origin
from trisocks.policy import parse_rules
from trisocks.server.http_messages import HOP_BY_HOP, MAX_HEAD_SIZE, MAX_HEADERS, end_to_end

AUTH = "Proxy-Authorization: Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


@pytest.fixture
def start_http(start_proxy: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    route_http(monkeypatch)
    return start_proxy


@pytest.fixture
async def hproxy(start_http: Callable[..., Any]) -> Proxy:
    return await start_http()


@pytest.fixture
async def origin(nursery: trio.Nursery, tmp_path: Path) -> Origin:
    (tmp_path / "blob").write_bytes(BLOB)
    return await start_origin(nursery, tmp_path)


def logged(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.session for r in caplog.records if r.name == "trisocks.access"]  # type: ignore[attr-defined]


async def read_head(stream: trio.abc.ReceiveStream) -> tuple[int, dict[str, str], bytes]:
    """A response head: status, headers (lower-case names; last wins), bytes after it."""
    data = bytearray()
    with trio.fail_after(10):
        while b"\r\n\r\n" not in data:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise EOFError(bytes(data))
            data += chunk
    head, _, rest = bytes(data).partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, rest


async def probe(proxy: Proxy, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send *data*, return the status, headers and the whole rest (until the proxy closes)."""
    with trio.fail_after(10):
        stream = await proxy.open_raw()
        async with stream:
            await stream.send_all(data)
            status, headers, rest = await read_head(stream)
            return status, headers, rest + await receive_all(stream)


def connect_head(host: str, port: int, auth: str | None = AUTH) -> bytes:
    lines = [f"CONNECT {host}:{port} HTTP/1.1", f"Host: {host}:{port}"]
    return ("\r\n".join(lines + ([auth] if auth else [])) + "\r\n\r\n").encode()


# --- CONNECT ---------------------------------------------------------------------------------


async def test_connect_tunnel_relays_and_is_logged(
    hproxy: Proxy, echo_server: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trisocks.access")
    stream = await hproxy.open_raw()
    payload = bytes(range(256)) * 4096
    async with stream:
        await stream.send_all(connect_head(*echo_server))
        status, headers, rest = await read_head(stream)
        assert (status, rest) == (200, b"")
        assert "content-length" not in headers and "transfer-encoding" not in headers
        with trio.fail_after(10):
            assert await echo_round_trip(stream, payload) == payload
    await eventually(lambda: logged(caplog))
    (entry,) = logged(caplog)
    assert (entry["user"], entry["command"], entry["target"], entry["reply"]) == (
        USER, "CONNECT", f"127.0.0.1:{echo_server[1]}", 0)
    assert entry["protocol"] == "http-connect"
    assert entry["bytes_up"] == entry["bytes_down"] == len(payload)


async def test_connect_early_payload_goes_first(
    hproxy: Proxy, echo_server: tuple[str, int]
) -> None:
    """Bytes pipelined right behind the CONNECT head are tunnelled, not lost."""
    stream = await hproxy.open_raw()
    async with stream:
        await stream.send_all(connect_head(*echo_server) + b"early")
        status, _, rest = await read_head(stream)
        assert status == 200
        with trio.fail_after(10):
            assert rest + await echo_round_trip(stream, b" late") == b"early late"


async def test_connect_every_split_point(hproxy: Proxy, echo_server: tuple[str, int]) -> None:
    head = connect_head(*echo_server)
    for split in range(1, len(head)):
        with trio.fail_after(10):
            stream = await hproxy.open_raw()
            async with stream:
                stream.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                await stream.send_all(head[:split])
                await trio.lowlevel.checkpoint()
                await stream.send_all(head[split:])
                status, _, rest = await read_head(stream)
                assert status == 200, split
                assert rest + await echo_round_trip(stream, b"x") == b"x"


NAME = st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12).map(str.encode)


@given(
    headers=st.lists(st.tuples(NAME, st.binary(max_size=8)), max_size=12),
    named=st.lists(NAME, max_size=3),
)
@settings(max_examples=200)
def test_end_to_end_headers(headers: list[tuple[bytes, bytes]], named: list[bytes]) -> None:
    """Hypothesis: whatever the headers, none that is hop-by-hop (or named by Connection)
    survives, and every other one is kept, in order."""
    everything = [*headers, (b"connection", b", ".join(named)), (b"te", b"trailers")]
    kept = end_to_end(everything)
    dropped = HOP_BY_HOP | set(named)
    assert kept == [(n, v) for n, v in everything if n not in dropped]


# --- errors -----------------------------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"CONNECT nohost HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n", 400),
        (b"CONNECT a:99999 HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n", 400),
        (b"GET /relative HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n", 400),
        (b"GET https://127.0.0.1/ HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n", 501),
        (b"GET ftp://127.0.0.1/ HTTP/1.1\r\nHost: x\r\n%s\r\n\r\n", 400),
        (b"GET http://127.0.0.1/ HTTP/1.1\r\nHost : x\r\n%s\r\n\r\n", 400),
        (b"GARBAGE\r\n\r\n%s", 400),
        (b"GE\x00\xff%s", 400),  # no line end: refused at once, not at the size limit
        # smuggling: differing duplicate Content-Length, CL + TE, obs-fold, unknown coding
        (b"POST http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
         b"Content-Length: 4\r\n%s\r\n\r\nabcd", 400),
        (b"POST http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
         b"Transfer-Encoding: chunked\r\n%s\r\n\r\n0\r\n\r\n", 400),
        (b"POST http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\nX-A: a\r\n folded\r\n%s\r\n\r\n", 400),
        (b"POST http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\nX-A: a\r\n\tfolded\r\n%s\r\n\r\n", 400),
        (b"POST http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n"
         b"%s\r\n\r\n", 501),
        (b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\n%s\r\nX-Big: " + b"a" * MAX_HEAD_SIZE
         + b"\r\n\r\n", 431),
        (b"GET http://127.0.0.1/ HTTP/1.1\r\nHost: x\r\n%s\r\n"
         + b"".join(b"X-%d: 1\r\n" % i for i in range(MAX_HEADERS)) + b"\r\n", 431),
    ],
    ids=["connect-no-port", "connect-bad-port", "origin-form", "https", "ftp", "space-colon",
         "garbage", "binary", "cl-cl", "cl-te", "obs-fold-sp", "obs-fold-tab", "te-gzip",
         "head-size", "header-count"],
)
async def test_refused_heads(hproxy: Proxy, head: bytes, status: int) -> None:
    got, headers, body = await probe(hproxy, head.replace(b"%s", AUTH.encode(), 1))
    assert got == status, body
    assert headers["connection"] == "close"
    assert body.startswith(b"%d " % status)


async def test_identical_duplicate_content_length_is_one(
    hproxy: Proxy, origin: Origin
) -> None:
    head = (f"POST {origin.base}/echo HTTP/1.1\r\nHost: x\r\n{AUTH}\r\nContent-Length: 3\r\n"
            "Content-Length: 3\r\nConnection: close\r\n\r\nabc").encode()
    status, _, body = await probe(hproxy, head)
    assert (status, body) == (200, b"abc")


@pytest.mark.parametrize(
    ("auth", "status"),
    [(None, 407), ("Proxy-Authorization: Basic " + base64.b64encode(b"alice:wrong").decode(), 407),
     ("Proxy-Authorization: Basic !!!", 407), ("Proxy-Authorization: Digest x=1", 407),
     (AUTH, 200)],
    ids=["missing", "wrong", "malformed", "digest", "right"],
)
async def test_proxy_authentication(
    hproxy: Proxy, echo_server: tuple[str, int], auth: str | None, status: int
) -> None:
    stream = await hproxy.open_raw()
    async with stream:
        await stream.send_all(connect_head(*echo_server, auth=auth))
        got, headers, _ = await read_head(stream)
    assert got == status
    if status == 407:
        assert headers["proxy-authenticate"] == 'Basic realm="trisocks"'


async def test_wrong_password_counts_as_auth_failure(
    hproxy: Proxy, echo_server: tuple[str, int]
) -> None:
    bad = "Proxy-Authorization: Basic " + base64.b64encode(b"alice:nope").decode()
    status, _, _ = await probe(hproxy, connect_head(*echo_server, auth=bad))
    assert status == 407
    await eventually(lambda: hproxy.ctx.stats.handshake_failures["auth_failed"] == 1)


async def test_anonymous_where_auth_none(
    start_http: Callable[..., Any], echo_server: tuple[str, int]
) -> None:
    proxy = await start_http(auth=("none",))
    stream = await proxy.open_raw()
    async with stream:
        await stream.send_all(connect_head(*echo_server, auth=None))
        status, _, _ = await read_head(stream)
        assert status == 200
        with trio.fail_after(10):
            assert await echo_round_trip(stream, b"anon") == b"anon"


async def test_rule_denial_is_403_with_rule_in_log(
    start_http: Callable[..., Any], echo_server: tuple[str, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trisocks.access")
    rules = parse_rules([{"id": "no-echo", "action": "deny", "ports": [echo_server[1]]}])
    proxy = await start_http(rules=rules)
    status, _, body = await probe(proxy, connect_head(*echo_server))
    assert status == 403 and b"no-echo" in body
    get = (f"GET http://127.0.0.1:{echo_server[1]}/ HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n\r\n")
    status, _, _ = await probe(proxy, get.encode())
    assert status == 403
    await eventually(lambda: len(logged(caplog)) == 2)
    assert [(e["rule"], e["reply"]) for e in logged(caplog)] == [("no-echo", 2)] * 2


async def test_upstream_failures(hproxy: Proxy, loopback_dns: None) -> None:
    status, _, _ = await probe(hproxy, connect_head("127.0.0.1", _closed_port()))
    assert status == 502
    status, _, body = await probe(hproxy, connect_head("nowhere.invalid", 80))
    assert status == 502 and b"resolve" in body
    get = f"GET http://127.0.0.1:{_closed_port()}/x HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n\r\n"
    status, _, _ = await probe(hproxy, get.encode())
    assert status == 502


async def test_connect_timeout_is_504(
    start_http: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A dial that never completes (held by a never-set event) hits connect_timeout."""
    import trisocks.server.connect as connect  # the one dial of CONNECTs, SOCKS and HTTP

    async def hang(*args: Any) -> Any:
        await trio.Event().wait()

    monkeypatch.setattr(connect, "dial", hang)
    proxy = await start_http(connect_timeout=0.2)
    status, _, _ = await probe(proxy, connect_head("127.0.0.1", 9))
    assert status == 504


# --- forwarding -------------------------------------------------------------------------------


async def test_forward_get_strips_hop_by_hop_and_adds_via(
    hproxy: Proxy, origin: Origin
) -> None:
    head = (f"GET {origin.base}/headers HTTP/1.1\r\nHost: wrong.example\r\n{AUTH}\r\n"
            "Connection: close, X-Private\r\nX-Private: 1\r\nProxy-Connection: keep-alive\r\n"
            "Keep-Alive: 300\r\nTE: trailers\r\nUpgrade: websocket\r\nX-Kept: yes\r\n\r\n")
    status, headers, body = await probe(hproxy, head.encode())
    assert status == 200
    seen = {name.lower(): value for name, value in json.loads(body)}
    assert seen["host"] == f"127.0.0.1:{origin.port}"
    assert seen["x-kept"] == "yes" and seen["via"] == "1.1 trisocks"
    for name in ("x-private", "proxy-connection", "keep-alive", "te", "upgrade",
                 "proxy-authorization"):
        assert name not in seen
    assert origin.heads[-1]["target"] == "/headers"
    assert "via" in headers


async def test_forward_response_hop_by_hop_removed(hproxy: Proxy, origin: Origin) -> None:
    head = f"GET {origin.base}/hop HTTP/1.1\r\nHost: x\r\n{AUTH}\r\nConnection: close\r\n\r\n"
    status, headers, body = await probe(hproxy, head.encode())
    assert (status, body) == (200, b"hop")
    assert "x-secret" not in headers and "keep-alive" not in headers


async def test_keep_alive_across_hosts_each_judged(
    hproxy: Proxy, origin: Origin, nursery: trio.Nursery, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three requests on one client connection, to two origins (one of them chunked): each
    answered in order; the session is accounted once, with every byte."""
    caplog.set_level(logging.INFO, logger="trisocks.access")
    other = await start_origin(nursery, tmp_path)
    stream = await hproxy.open_raw()
    async with stream:
        got = []
        for base, path in [(origin.base, "/blob"), (other.base, "/chunked/blob"),
                           (origin.base, "/echo")]:
            await stream.send_all(f"GET {base}{path} HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n\r\n"
                                  .encode())
            status, headers, rest = await read_head(stream)
            assert status == 200
            body = bytearray(rest)
            if "content-length" in headers:
                while len(body) < int(headers["content-length"]):
                    body += await stream.receive_some(65536)
            else:
                assert headers["transfer-encoding"] == "chunked"
                while not body.endswith(b"0\r\n\r\n"):
                    body += await stream.receive_some(65536)
                body = bytearray(_dechunk(bytes(body)))
            got.append(hashlib.sha256(body).hexdigest())
    assert got[:2] == [hashlib.sha256(BLOB).hexdigest()] * 2
    await eventually(lambda: logged(caplog))
    (entry,) = logged(caplog)
    assert entry["user"] == USER and entry["bytes_down"] > 2 * len(BLOB)
    assert entry["protocol"] == "http"


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[:size]
        data = data[size + 2:]


async def test_post_body_streamed_chunked(hproxy: Proxy, origin: Origin) -> None:
    body = bytes(range(256)) * 1024
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 10000]), body[i:i + 10000])
                      for i in range(0, len(body), 10000)) + b"0\r\n\r\n"
    head = (f"POST {origin.base}/echo HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n"
            "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n").encode()
    status, _, got = await probe(hproxy, head + chunks)
    assert status == 200 and hashlib.sha256(got).digest() == hashlib.sha256(body).digest()


async def test_one_user_per_connection(hproxy: Proxy, origin: Origin, store: Any) -> None:
    from trisocks.passwords import hash_password

    store.add_user("bob", hash_password(b"bob-pass-1"))
    bob = "Proxy-Authorization: Basic " + base64.b64encode(b"bob:bob-pass-1").decode()
    stream = await hproxy.open_raw()
    async with stream:
        await stream.send_all(
            f"GET {origin.base}/echo HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n\r\n".encode())
        assert (await read_head(stream))[0] == 200
        await stream.send_all(
            f"GET {origin.base}/echo HTTP/1.1\r\nHost: x\r\n{bob}\r\n\r\n".encode())
        assert (await read_head(stream))[0] == 400


async def test_blob_origin_connection_close(hproxy: Proxy, http_origin: HttpOrigin) -> None:
    """An origin that frames by closing: the client gets it chunked (HTTP/1.1) intact."""
    head = f"GET {http_origin.url} HTTP/1.1\r\nHost: x\r\n{AUTH}\r\nConnection: close\r\n\r\n"
    status, _, body = await probe(hproxy, head.encode())
    assert status == 200
    assert hashlib.sha256(body).digest() == hashlib.sha256(http_origin.body).digest()


# --- inside TLS (an HTTPS proxy) --------------------------------------------------------------


async def test_https_proxy_connect_forward_and_certificate_user(
    start_http: Callable[..., Any], tmp_path: Path, echo_server: tuple[str, int],
    origin: Origin, caplog: pytest.LogCaptureFixture,
) -> None:
    """On a tls:// listener: a CONNECT tunnel (relayed through Python, not spliced) and a
    forwarded GET, with Basic auth; with a client CA, the certificate's user needs no
    password."""
    import trustme

    from tests.test_tls import TLS_LISTEN, client_context, issue_server_files, open_tls

    caplog.set_level(logging.INFO, logger="trisocks.access")
    ca = trustme.CA()
    cert, key = issue_server_files(ca, tmp_path)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    proxy = await start_http(listen=TLS_LISTEN, tls_cert=cert, tls_key=key)
    payload = bytes(range(256)) * 512
    with trio.fail_after(20):
        stream = await open_tls(proxy, client_context(ca))
        await stream.send_all(connect_head(*echo_server))
        status, _, rest = await read_head(stream)
        assert (status, rest) == (200, b"")
        got = bytearray()
        await stream.send_all(payload)
        while len(got) < len(payload):
            got += await stream.receive_some(65536)
        assert got == payload
        await stream.aclose()

        stream = await open_tls(proxy, client_context(ca))
        await stream.send_all(f"GET {origin.base}/blob HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n"
                              "Connection: close\r\n\r\n".encode())
        status, _, rest = await read_head(stream)
        body = rest + await receive_all(stream)
        assert status == 200 and hashlib.sha256(body).digest() == hashlib.sha256(BLOB).digest()
        await stream.aclose()
    await eventually(lambda: len(logged(caplog)) == 2)
    assert [(e["protocol"], e["user"], e["reply"]) for e in logged(caplog)] == [
        ("http-connect", USER, 0), ("http", USER, 0)]

    carol = ca.issue_cert("carol@example.test", common_name="carol")
    with_ca = await start_http(listen=TLS_LISTEN, tls_cert=cert, tls_key=key,
                               tls_client_ca=ca_file)
    with trio.fail_after(20):
        stream = await open_tls(with_ca, client_context(ca, carol))
        await stream.send_all(connect_head(*echo_server, auth=None))
        status, _, _ = await read_head(stream)
        assert status == 200
        await stream.aclose()
    await eventually(lambda: len(logged(caplog)) == 3)
    assert logged(caplog)[-1]["user"] == "tls:carol"  # a CN: an identity of source tls


async def test_pipelined_requests_answered_in_order(hproxy: Proxy, origin: Origin) -> None:
    """Two requests in one segment: the second waits in h11's buffer, then is served."""
    heads = b"".join(
        f"POST {origin.base}/echo HTTP/1.1\r\nHost: x\r\n{AUTH}\r\nContent-Length: 3\r\n"
        f"{close}\r\n{body}".encode()
        for body, close in (("one", ""), ("two", "Connection: close\r\n"))
    )
    status, _, rest = await probe(hproxy, heads)
    assert status == 200
    assert rest.startswith(b"one") and rest.endswith(b"two") and b"HTTP/1.1 200" in rest


async def test_kill_ends_a_keep_alive_connection(hproxy: Proxy, origin: Origin) -> None:
    stream = await hproxy.open_raw()
    async with stream:
        await stream.send_all(
            f"GET {origin.base}/echo HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n\r\n".encode())
        assert (await read_head(stream))[0] == 200
        (session,) = hproxy.ctx.registry.select()
        assert hproxy.ctx.registry.kill(session.id)
        with trio.fail_after(10):
            assert await receive_all(stream) == b""
    await eventually(lambda: not hproxy.ctx.registry.select())


async def test_keep_alive_holds_one_session_slot(
    start_http: Callable[..., Any], origin: Origin
) -> None:
    """With max_sessions_per_user = 1, request after request on one connection passes (each
    gives back its slot), while a second connection meanwhile is refused (403)."""
    proxy = await start_http(max_sessions_per_user=1)
    stream = await proxy.open_raw()
    async with stream:
        for _ in range(3):
            await stream.send_all(
                f"GET {origin.base}/echo HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n\r\n".encode())
            assert (await read_head(stream))[0] == 200
        status, _, body = await probe(proxy, connect_head("127.0.0.1", origin.port))
        assert status == 403 and b"sessions already" in body
