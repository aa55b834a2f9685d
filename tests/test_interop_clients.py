"""Real third-party SOCKS5 clients against trisocks: curl and python-socks (trio backend),
each downloading a 6 MiB blob from a local HTTP server and checking its hash."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest
import trio

from tests.conftest import PASSWORD, USER, HttpOrigin, Proxy, curl, eventually

pytestmark = pytest.mark.interop


async def curl_fetch(proxy_flag: str, proxy_url: str, url: str) -> bytes:
    result = await trio.run_process(
        [curl(), "--silent", "--show-error", "--fail", "--max-time", "20", proxy_flag, proxy_url,
         url],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


@pytest.mark.parametrize("flag", ["--socks5", "--socks5-hostname"])
async def test_curl_with_password(flag: str, proxy: Proxy, http_origin: HttpOrigin) -> None:
    url = http_origin.url.replace("127.0.0.1", "localhost") if "hostname" in flag else (
        http_origin.url
    )
    with trio.fail_after(30):
        body = await curl_fetch(flag, f"{USER}:{PASSWORD}@127.0.0.1:{proxy.port}", url)
    assert hashlib.sha256(body).digest() == hashlib.sha256(http_origin.body).digest()
    await eventually(lambda: not len(proxy.ctx.registry))
    usage = {u["user"]: u for u in proxy.ctx.accountant.live_usage()}
    assert usage[USER]["bytes_down"] > len(http_origin.body)


@pytest.mark.parametrize("flag", ["--socks5", "--socks5-hostname"])
async def test_curl_without_password(
    flag: str, start_proxy: Any, http_origin: HttpOrigin
) -> None:
    proxy = await start_proxy(auth=("none",))
    with trio.fail_after(30):
        body = await curl_fetch(flag, f"127.0.0.1:{proxy.port}", http_origin.url)
    assert hashlib.sha256(body).digest() == hashlib.sha256(http_origin.body).digest()


async def test_curl_wrong_password_fails(proxy: Proxy, http_origin: HttpOrigin) -> None:
    with trio.fail_after(30):
        result = await trio.run_process(
            [curl(), "--silent", "--socks5", f"{USER}:nope@127.0.0.1:{proxy.port}",
             http_origin.url],
            capture_stdout=True, capture_stderr=True, check=False,
        )
    assert result.returncode == 97  # CURLE_PROXY: the proxy handshake failed
    assert result.stdout == b""


async def test_python_socks_trio_backend(proxy: Proxy, http_origin: HttpOrigin) -> None:
    from python_socks.async_.trio import Proxy as SocksProxy

    socks = SocksProxy.from_url(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{proxy.port}")
    with trio.fail_after(30):
        sock = await socks.connect(dest_host="localhost", dest_port=http_origin.port)
        stream = trio.SocketStream(sock)
        async with stream:
            await stream.send_all(b"GET /blob HTTP/1.1\r\nHost: x\r\n\r\n")
            data = bytearray()
            while chunk := await stream.receive_some(1 << 16):
                data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert hashlib.sha256(body).digest() == hashlib.sha256(http_origin.body).digest()


async def test_python_socks_reports_auth_failure(proxy: Proxy, http_origin: HttpOrigin) -> None:
    from python_socks import ProxyError
    from python_socks.async_.trio import Proxy as SocksProxy

    socks = SocksProxy.from_url(f"socks5://{USER}:wrong@127.0.0.1:{proxy.port}")
    with trio.fail_after(10), pytest.raises(ProxyError):
        await socks.connect(dest_host="127.0.0.1", dest_port=http_origin.port)
