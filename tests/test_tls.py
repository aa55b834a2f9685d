"""TLS listeners (``listen = ["tls://..."]``): SOCKS5 inside TLS, client certificates as
identity, plain clients refused, certificates re-read on reload, and real clients (curl).

Certificates come from a throwaway CA (``trustme``); every client is real TLS over loopback.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
import trio.testing
import trustme

from tests.admin_support import ADMIN, TOKEN, admin_url
from tests.conftest import (
    BLOB,
    PASSWORD,
    USER,
    HttpOrigin,
    Proxy,
    connect_request,
    eventually,
    have_ipv6,
    read_reply,
    receive_all,
    receive_exactly,
    socks_handshake,
)
from tests.test_cli import run
from trisocks.config import ConfigError, Endpoint, build_config
from trisocks.server.relay import relay_streams
from trisocks.server.reload import reload_config
from trisocks.sessions import Counters

TLS_LISTEN = (Endpoint("127.0.0.1", 0, tls=True),)


@attrs.frozen
class Pki:
    """A CA, the server's certificate files it issued, and the CA's PEM file."""

    ca: trustme.CA
    cert: Path
    key: Path
    ca_file: Path


def issue_server_files(ca: trustme.CA, directory: Path, name: str = "server") -> tuple[Path, Path]:
    cert = ca.issue_cert("127.0.0.1", "::1", "localhost")
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}.key"
    cert.private_key_and_cert_chain_pem.write_to_path(str(key_file))
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    return cert_file, key_file


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    ca = trustme.CA()
    cert, key = issue_server_files(ca, tmp_path)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    return Pki(ca, cert, key, ca_file)


def client_context(ca: trustme.CA, client_cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    if client_cert is not None:
        client_cert.configure_cert(context)
    return context


async def open_tls(proxy: Proxy, context: ssl.SSLContext) -> trio.SSLStream[trio.SocketStream]:
    raw = await proxy.open_raw()
    stream = trio.SSLStream(raw, context, server_hostname=proxy.host)
    try:
        await stream.do_handshake()
    except BaseException:
        await trio.aclose_forcefully(raw)
        raise
    return stream


async def tls_proxy(start_proxy: Callable[..., Any], pki: Pki, **overrides: Any) -> Proxy:
    settings = {"listen": TLS_LISTEN, "tls_cert": pki.cert, "tls_key": pki.key, **overrides}
    proxy: Proxy = await start_proxy(**settings)
    return proxy


def access_records(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.session for r in caplog.records if r.name == "trisocks.access"]  # type: ignore[attr-defined]


async def fetch_blob(stream: trio.abc.Stream, origin: HttpOrigin) -> bytes:
    """GET /blob over an open CONNECT tunnel; the body (the origin closes after it)."""
    await stream.send_all(b"GET /blob HTTP/1.1\r\nHost: origin\r\n\r\n")
    response = await receive_all(stream)
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


# --- SOCKS5 inside TLS --------------------------------------------------------------------


async def test_socks5_over_tls_connect_is_logged_and_listed_with_tls(
    start_proxy: Callable[..., Any], pki: Pki, http_origin: HttpOrigin,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trisocks.access")
    proxy = await tls_proxy(start_proxy, pki, admin=ADMIN, admin_token=TOKEN)
    with trio.fail_after(20):
        stream = await open_tls(proxy, client_context(pki.ca))
        await socks_handshake(stream, USER, PASSWORD)  # type: ignore[arg-type]
        await stream.send_all(connect_request(http_origin.host, http_origin.port))
        rep, _, _ = await read_reply(stream)
        assert rep == 0
        async with httpx.AsyncClient(
            base_url=admin_url(proxy), headers={"Authorization": f"Bearer {TOKEN}"}
        ) as api:
            (listed,) = (await api.get("/api/sessions")).json()["sessions"]
        assert listed["user"] == USER
        (live,) = proxy.ctx.registry
        assert live.tls is True
        assert listed["tls"] is True
        body = await fetch_blob(stream, http_origin)
        assert hashlib.sha256(body).digest() == hashlib.sha256(BLOB).digest()
        await stream.aclose()
        await eventually(lambda: access_records(caplog))
    (record,) = access_records(caplog)
    assert record["user"] == USER and record["target"].endswith(f":{http_origin.port}")
    assert record["bytes_down"] >= len(BLOB) and record["reason"] == "target closed"


async def test_ipv6_tls_listener(
    start_proxy: Callable[..., Any], pki: Pki, echo_server: tuple[str, int],
) -> None:
    if not have_ipv6():
        pytest.fail("this machine has no IPv6 loopback; the IPv6 tests need ::1")
    proxy = await tls_proxy(start_proxy, pki, listen=(Endpoint("::1", 0, tls=True),))
    assert proxy.host == "::1"
    with trio.fail_after(20):
        stream = await open_tls(proxy, client_context(pki.ca))
        async with stream:
            await socks_handshake(stream)  # type: ignore[arg-type]
            await stream.send_all(connect_request(*echo_server))
            assert (await read_reply(stream))[0] == 0
            await stream.send_all(b"over [::1]")
            assert await receive_exactly(stream, 10) == b"over [::1]"


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_tls_listen_entries_parse(family: str) -> None:
    text = {"ipv4": "tls://0.0.0.0:1443", "ipv6": "tls://[::1]:1443"}[family]
    endpoint = Endpoint.parse(text)
    assert endpoint.tls and endpoint.port == 1443 and str(endpoint) == text
    assert not Endpoint.parse("127.0.0.1:1080").tls


# --- client certificates ------------------------------------------------------------------


async def test_client_certificate_names_the_user_without_a_password(
    start_proxy: Callable[..., Any], pki: Pki, echo_server: tuple[str, int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trisocks.access")
    proxy = await tls_proxy(start_proxy, pki, tls_client_ca=pki.ca_file, auth=("password",))
    carol = pki.ca.issue_cert("carol@example.test", common_name="carol")
    with trio.fail_after(20):
        stream = await open_tls(proxy, client_context(pki.ca, carol))
        await socks_handshake(stream, None)  # type: ignore[arg-type]  # 05 00: no password
        await stream.send_all(connect_request(*echo_server))
        rep, _, _ = await read_reply(stream)
        assert rep == 0
        (live,) = proxy.ctx.registry
        assert live.user == "tls:carol" and live.tls
        payload = os.urandom(256 * 1024)
        await stream.send_all(payload)
        assert await receive_exactly(stream, len(payload)) == payload
        await stream.aclose()
        await eventually(lambda: access_records(caplog))
    (record,) = access_records(caplog)
    assert record["user"] == "tls:carol" and record["bytes_up"] == len(payload)


@pytest.mark.parametrize("presented", ["none", "untrusted"])
async def test_client_certificate_required_when_a_ca_is_set(
    start_proxy: Callable[..., Any], pki: Pki, presented: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trisocks.access")
    proxy = await tls_proxy(start_proxy, pki, tls_client_ca=pki.ca_file)
    stranger = trustme.CA().issue_cert("carol@example.test", common_name="carol")
    context = client_context(pki.ca, stranger if presented == "untrusted" else None)
    with trio.fail_after(20):
        refused = False
        try:  # TLS 1.3: the client's handshake ends before the server judges its certificate
            stream = await open_tls(proxy, context)
            async with stream:
                await stream.send_all(b"\x05\x01\x00")
                refused = await stream.receive_some(2) == b""
        except (trio.BrokenResourceError, OSError):
            refused = True
        assert refused
        await eventually(lambda: access_records(caplog))
    assert proxy.ctx.stats.handshake_failures["tls"] == 1
    (record,) = access_records(caplog)
    assert record["user"] is None and record["reason"].startswith("tls")


# --- a plain client on a TLS port ---------------------------------------------------------


async def test_plain_socks_client_on_a_tls_port_is_closed_and_counted(
    start_proxy: Callable[..., Any], pki: Pki, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trisocks.access")
    proxy = await tls_proxy(start_proxy, pki)
    with trio.fail_after(20):
        async with await proxy.open_raw() as raw:
            await raw.send_all(b"\x05\x01\x02")
            try:
                answer = await receive_all(raw)  # at most a TLS alert, then the close
            except OSError:
                answer = b""
        assert not answer.startswith(b"\x05")
        await eventually(lambda: access_records(caplog))
    assert proxy.ctx.stats.handshake_failures["tls"] == 1
    (record,) = access_records(caplog)
    assert record["reason"].startswith("tls")


# --- reload -------------------------------------------------------------------------------


async def test_reload_new_certificate_for_new_handshakes_live_session_continues(
    start_proxy: Callable[..., Any], pki: Pki, tmp_path: Path, echo_server: tuple[str, int],
) -> None:
    proxy = await tls_proxy(start_proxy, pki)
    values = {"listen": ["tls://127.0.0.1:0"], "tls_cert": str(pki.cert),
              "tls_key": str(pki.key), "db": str(proxy.ctx.config.db), "admin": "off"}
    proxy.ctx.load_config = lambda: build_config(values, {})
    old_client, new_ca = client_context(pki.ca), trustme.CA()
    new_client = client_context(new_ca)
    with trio.fail_after(20):
        live = await open_tls(proxy, old_client)
        await socks_handshake(live)  # type: ignore[arg-type]
        await live.send_all(connect_request(*echo_server))
        assert (await read_reply(live))[0] == 0

        new_cert, new_key = issue_server_files(new_ca, tmp_path, "new")
        pki.cert.write_bytes(new_cert.read_bytes())
        pki.key.write_bytes(new_key.read_bytes())
        reload_config(proxy.ctx)
        stream = await open_tls(proxy, new_client)  # the new certificate
        await socks_handshake(stream)  # type: ignore[arg-type]
        await stream.aclose()
        with pytest.raises(trio.BrokenResourceError):  # the old CA's no longer
            await open_tls(proxy, old_client)

        pki.cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n")
        with pytest.raises(ConfigError, match="tls_cert"):
            reload_config(proxy.ctx)
        assert proxy.ctx.stats.reloads["failed"] == 1
        stream = await open_tls(proxy, new_client)  # the running one stays
        await socks_handshake(stream)  # type: ignore[arg-type]
        await stream.aclose()

        await live.send_all(b"still here")  # the live session kept its TLS session
        assert await receive_exactly(live, 10) == b"still here"
        await live.aclose()


@pytest.mark.parametrize("case", ["ok", "no-key", "missing-file", "garbage", "bad-client-ca"])
def test_check_loads_the_tls_files_and_names_a_bad_one_in_one_line(
    pki: Pki, tmp_path: Path, case: str
) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    flags = {"--listen": "tls://127.0.0.1:1443", "--tls-cert": str(pki.cert),
             "--tls-key": str(pki.key), "--tls-client-ca": str(pki.ca_file)}
    if case == "no-key":
        del flags["--tls-key"]
    elif case == "missing-file":
        flags["--tls-cert"] = str(tmp_path / "absent.pem")
    elif case == "garbage":
        flags["--tls-key"] = str(garbage)
    elif case == "bad-client-ca":
        flags["--tls-client-ca"] = str(garbage)
    result = run("check", *(part for pair in flags.items() for part in pair),
                 db=tmp_path / "t.db")
    if case == "ok":
        assert result.returncode == 0 and result.stdout.startswith("configuration OK")
        return
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    key = {"no-key": "listen", "bad-client-ca": "tls_client_ca"}.get(case, "tls_cert")
    assert line.startswith(f"trisocks: error: {key}: "), line


# --- real clients -------------------------------------------------------------------------


def _program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed")
    return path


@pytest.mark.interop
@pytest.mark.parametrize("mode", ["forward", "tunnel"])
async def test_curl_https_proxy(
    start_proxy: Callable[..., Any], pki: Pki, http_origin: HttpOrigin, mode: str,
) -> None:
    """``curl --proxy https://...``: the HTTP proxy inside TLS (a GET with an absolute URL,
    or CONNECT with ``--proxytunnel``), the proxy's certificate checked against the CA."""
    proxy = await tls_proxy(start_proxy, pki)
    argv = [_program("curl"), "--silent", "--show-error", "--fail", "--max-time", "20",
            "--proxy", f"https://127.0.0.1:{proxy.port}", "--proxy-cacert", str(pki.ca_file),
            "--proxy-user", f"{USER}:{PASSWORD}", http_origin.url]
    if mode == "tunnel":
        argv.insert(1, "--proxytunnel")
    with trio.fail_after(30):
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                        check=False)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(BLOB).digest()


PAGE = b"<html><body><p id=marker>through the https proxy</p></body></html>"


async def _serve_page(stream: trio.SocketStream) -> None:
    async with stream:
        request = b""
        while b"\r\n\r\n" not in request and len(request) < 65536:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            request += chunk
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: "
                              b"%d\r\nConnection: close\r\n\r\n%s" % (len(PAGE), PAGE))


@pytest.mark.browser
async def test_chromium_https_proxy_with_the_ca_in_nss(
    start_proxy: Callable[..., Any], pki: Pki, nursery: trio.Nursery, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Chromium ``--proxy-server=https://...`` trusting the test CA through its NSS db (a
    temporary HOME), no certificate errors ignored. Chromium cannot be given proxy passwords
    on its command line: the loopback listener runs with ``auth = none``."""
    caplog.set_level(logging.INFO, logger="trisocks.access")
    chromium = _program("chromium")
    certutil = _program("certutil")
    listeners = await nursery.start(
        functools.partial(trio.serve_tcp, _serve_page, 0, host="127.0.0.1")
    )
    origin_port = listeners[0].socket.getsockname()[1]
    proxy = await tls_proxy(start_proxy, pki, auth=("none",))
    home = tmp_path / "home"
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    env = {**os.environ, "HOME": str(home)}
    with trio.fail_after(60):
        await trio.run_process([certutil, "-d", f"sql:{nssdb}", "-N", "--empty-password"],
                               env=env, capture_stdout=True, capture_stderr=True)
        await trio.run_process([certutil, "-d", f"sql:{nssdb}", "-A", "-t", "C,,", "-n", "test",
                                "-i", str(pki.ca_file)], env=env, capture_stdout=True,
                               capture_stderr=True)
        result = await trio.run_process(
            [chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}",
             f"--proxy-server=https://127.0.0.1:{proxy.port}",
             "--proxy-bypass-list=<-loopback>",  # loopback targets go through the proxy too
             "--dump-dom", f"http://127.0.0.1:{origin_port}/"],
            env=env, capture_stdout=True, capture_stderr=True, check=False,
        )
        assert b"through the https proxy" in result.stdout, result.stderr.decode(
            errors="replace")[-2000:]
        await eventually(lambda: any((r["target"] or "").endswith(f":{origin_port}")
                                     for r in access_records(caplog)), limit=10)


@pytest.mark.interop
async def test_curl_https_proxy_with_a_client_certificate_needs_no_password(
    start_proxy: Callable[..., Any], pki: Pki, http_origin: HttpOrigin, tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trisocks.access")
    proxy = await tls_proxy(start_proxy, pki, tls_client_ca=pki.ca_file, auth=("password",))
    carol = pki.ca.issue_cert("carol@example.test", common_name="carol")
    cert_file, key_file = tmp_path / "carol.pem", tmp_path / "carol.key"
    carol.cert_chain_pems[0].write_to_path(str(cert_file))
    carol.private_key_pem.write_to_path(str(key_file))
    argv = [_program("curl"), "--silent", "--show-error", "--fail", "--max-time", "20",
            "--proxy", f"https://127.0.0.1:{proxy.port}", "--proxy-cacert", str(pki.ca_file),
            "--proxy-cert", str(cert_file), "--proxy-key", str(key_file), http_origin.url]
    with trio.fail_after(30):
        result = await trio.run_process(argv, capture_stdout=True, capture_stderr=True,
                                        check=False)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert hashlib.sha256(result.stdout).digest() == hashlib.sha256(BLOB).digest()
        await eventually(lambda: access_records(caplog))
    assert [r["user"] for r in access_records(caplog)] == ["tls:carol"]


async def test_bind_inside_tls_listens_on_the_control_connections_address(
    start_proxy: Callable[..., Any], pki: Pki,
) -> None:
    """BIND opens its listener where the TLS control connection arrived (the socket under
    the TLS stream), and relays the peer's bytes into TLS."""
    proxy = await tls_proxy(start_proxy, pki)
    with trio.fail_after(20):
        stream = await open_tls(proxy, client_context(pki.ca))
        async with stream:
            await socks_handshake(stream)  # type: ignore[arg-type]
            await stream.send_all(connect_request("0.0.0.0", 0, cmd=2))
            rep, address, port = await read_reply(stream)
            assert rep == 0 and address == b"\x01\x7f\x00\x00\x01"
            async with await trio.open_tcp_stream("127.0.0.1", port) as peer:
                assert (await read_reply(stream))[0] == 0
                await peer.send_all(b"from the peer")
                assert await receive_exactly(stream, 13) == b"from the peer"
                await stream.send_all(b"to the peer")
                assert await receive_exactly(peer, 11) == b"to the peer"


# --- the stream relay (what TLS sessions use), in memory ----------------------------------


@pytest.mark.deadline(150)  # virtual time: the relay's idle timeout is 30 s
@pytest.mark.parametrize("case", ["idle", "target-eof", "client-eof-then-target-eof"])
async def test_relay_streams_close_reasons(
    autojump_clock: trio.testing.MockClock, case: str
) -> None:
    """The client side is TLS-like (no half-close): the target's EOF ends the relay; the
    client's EOF is passed on and the relay waits for the target's."""
    client_far, client_near = trio.testing.memory_stream_pair()
    target_near, target_far = trio.testing.memory_stream_pair()
    tls_like = _NoHalfClose(client_near)
    counters = Counters()
    result: list[str] = []

    async def run() -> None:
        result.append(await relay_streams(tls_like, target_near, counters, idle_timeout=30))

    with trio.fail_after(100):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            await client_far.send_all(b"up")
            assert await target_far.receive_some(2) == b"up"
            if case == "target-eof":
                await target_far.send_all(b"down")
                await target_far.send_eof()
                assert await client_far.receive_some(4) == b"down"
            elif case == "client-eof-then-target-eof":
                await client_far.send_eof()
                assert await target_far.receive_some() == b""  # the EOF passed on
                await target_far.send_all(b"late")
                assert await client_far.receive_some(4) == b"late"
                await target_far.send_eof()
    expected = {"idle": "idle timeout", "target-eof": "target closed",
                "client-eof-then-target-eof": "client closed"}[case]
    assert result == [expected]
    assert counters.bytes_up == 2 and counters.bytes_down == {"idle": 0}.get(case, 4)


class _NoHalfClose(trio.abc.Stream):
    """A stream without ``send_eof``, as TLS is."""

    def __init__(self, stream: trio.abc.HalfCloseableStream) -> None:
        self._inner = stream  # not ``.stream``: wrappers named so pass send_eof on

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self._inner.receive_some(max_bytes)

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self._inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self._inner.wait_send_all_might_not_block()

    async def aclose(self) -> None:
        await self._inner.aclose()
