"""A third-party client: PySocks' UDP mode through trisocks to a local UDP echo server.

PySocks is blocking, so it runs in a worker thread while the proxy and the echo server run in
trio; its own socket timeout bounds the thread (a trio deadline cannot interrupt it).
"""

from __future__ import annotations

import socket
from typing import Any

import pytest
import socks
import trio

from tests.conftest import PASSWORD, USER, Proxy
from tests.test_udp import start_udp_echo


def pysocks_udp_round_trip(proxy: tuple[str, int], echo: Any, payload: bytes) -> tuple[bytes, Any]:
    with socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.set_proxy(socks.SOCKS5, proxy[0], proxy[1], username=USER, password=PASSWORD)
        sock.settimeout(10)
        sock.sendto(payload, echo[:2])
        data, source = sock.recvfrom(65536)
        return data, source


@pytest.mark.interop
async def test_pysocks_udp_through_trisocks(proxy: Proxy, nursery: trio.Nursery) -> None:
    echo = await start_udp_echo(nursery, "127.0.0.1")
    with trio.fail_after(20):
        data, source = await trio.to_thread.run_sync(
            pysocks_udp_round_trip, proxy.address, echo, b"hello from PySocks"
        )
    assert data == b"hello from PySocks"
    assert source == echo[:2]
    assert proxy.ctx.stats.udp_dropped["foreign_source"] == 0
