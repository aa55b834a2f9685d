"""More real clients through trisocks: ncat, proxychains4, Dante's socksify, httpx and PySocks.

Each test checks the payload by hash AND that it really went through the proxy (the proxy's
accounting saw the bytes), since some of these tools quietly connect directly to loopback
targets unless told not to."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from pathlib import Path

import pytest
import trio

from tests.conftest import PASSWORD, USER, HttpOrigin, Proxy, eventually

pytestmark = pytest.mark.interop


def program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/test installs it with apt-get)")
    return path


def proxied_bytes(proxy: Proxy) -> int:
    return sum(int(u["bytes_down"]) for u in proxy.ctx.accountant.live_usage())  # type: ignore[call-overload]


async def run_tool(argv: list[str], env: dict[str, str] | None = None, stdin: bytes = b"") -> bytes:
    with trio.fail_after(30):
        result = await trio.run_process(
            argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False,
            env={**os.environ, **(env or {})},
        )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def same(a: bytes, b: bytes) -> bool:
    return hashlib.sha256(a).digest() == hashlib.sha256(b).digest()


async def test_ncat(proxy: Proxy, echo_server: tuple[str, int]) -> None:
    out = await run_tool(
        [program("ncat"), "--proxy", f"127.0.0.1:{proxy.port}", "--proxy-type", "socks5",
         "--proxy-auth", f"{USER}:{PASSWORD}", "-w", "5", echo_server[0], str(echo_server[1])],
        stdin=b"ping through ncat\n",
    )
    assert out == b"ping through ncat\n"
    await eventually(lambda: proxied_bytes(proxy) >= len(out))


@pytest.mark.parametrize("by_name", [False, True], ids=["ip", "proxy-dns"])
async def test_proxychains(
    by_name: bool, loopback_dns: None, proxy: Proxy, http_origin: HttpOrigin, tmp_path: Path
) -> None:
    conf = tmp_path / "proxychains.conf"
    conf.write_text(
        "strict_chain\nquiet_mode\nproxy_dns\nremote_dns_subnet 224\n"
        "tcp_read_time_out 15000\ntcp_connect_time_out 8000\n[ProxyList]\n"
        f"socks5 127.0.0.1 {proxy.port} {USER} {PASSWORD}\n"
    )
    targets: list[str] = []
    proxy.ctx.registry.add_listener(
        lambda event, session: targets.append(str(session.target)) if event == "request" else None
    )
    host = "origin.trisocks.test" if by_name else "127.0.0.1"
    url = http_origin.url.replace("127.0.0.1", host)
    body = await run_tool([program("proxychains4"), "-f", str(conf), program("curl"), "-s", url])
    assert same(body, http_origin.body)
    await eventually(lambda: proxied_bytes(proxy) >= len(body))
    # with proxy_dns the name itself travels to the proxy (ATYP 03), not an address
    assert targets == [f"{host}:{http_origin.port}"]


async def test_socksify(proxy: Proxy, http_origin: HttpOrigin, tmp_path: Path) -> None:
    conf = tmp_path / "socks.conf"
    conf.write_text(
        "route {\n"
        f"  from: 0.0.0.0/0 to: 0.0.0.0/0 via: 127.0.0.1 port = {proxy.port}\n"
        "  proxyprotocol: socks_v5\n  method: username\n}\n"
    )
    env = {
        "SOCKS_CONF": str(conf),
        "SOCKS_USERNAME": USER,
        "SOCKS_PASSWORD": PASSWORD,
        # Dante's client routes local-interface networks (all of 127/8) directly by default.
        "SOCKS_AUTOADD_LANROUTES": "no",
    }
    body = await run_tool([program("socksify"), program("curl"), "-s", http_origin.url], env=env)
    assert same(body, http_origin.body)
    await eventually(lambda: proxied_bytes(proxy) >= len(body))


async def test_httpx_socks5(proxy: Proxy, http_origin: HttpOrigin) -> None:
    import httpx

    def fetch() -> bytes:
        with httpx.Client(proxy=f"socks5://{USER}:{PASSWORD}@127.0.0.1:{proxy.port}") as client:
            response = client.get(http_origin.url, timeout=20)
            response.raise_for_status()
            return response.content

    with trio.fail_after(30):
        body = await trio.to_thread.run_sync(fetch)
    assert same(body, http_origin.body)
    await eventually(lambda: proxied_bytes(proxy) >= len(body))


async def test_pysocks_tcp(proxy: Proxy, http_origin: HttpOrigin) -> None:
    import socks

    def fetch() -> bytes:
        s = socks.socksocket(socket.AF_INET, socket.SOCK_STREAM)
        s.set_proxy(socks.SOCKS5, "127.0.0.1", proxy.port, rdns=True, username=USER,
                    password=PASSWORD)
        s.settimeout(20)
        try:
            s.connect(("localhost", http_origin.port))
            s.sendall(b"GET /blob HTTP/1.0\r\n\r\n")
            chunks = []
            while chunk := s.recv(1 << 16):
                chunks.append(chunk)
        finally:
            s.close()
        return b"".join(chunks).partition(b"\r\n\r\n")[2]

    with trio.fail_after(30):
        body = await trio.to_thread.run_sync(fetch)
    assert same(body, http_origin.body)
