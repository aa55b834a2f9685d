"""CONNECT end to end over loopback: replies, BND address, relay, half-close."""

from __future__ import annotations

import ipaddress
import socket

import pytest
import trio

from tests.conftest import (
    Proxy,
    read_reply,
    receive_all,
    receive_exactly,
    socks_handshake,
)


def connect_request(host: str, port: int) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode()
        return b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big")
    atyp = b"\x01" if ip.version == 4 else b"\x04"
    return b"\x05\x01\x00" + atyp + ip.packed + port.to_bytes(2, "big")


async def test_connect_ipv4_relays_and_reports_bound_address(
    proxy: Proxy, echo_server: tuple[str, int]
) -> None:
    with trio.fail_after(5):
        stream = await proxy.open_raw()
        await socks_handshake(stream)
        await stream.send_all(connect_request(*echo_server))
        rep, addr, port = await read_reply(stream)
        assert rep == 0
        # BND.ADDR/BND.PORT are the outbound socket's real local address, not 0.0.0.0:0.
        assert addr == b"\x01" + socket.inet_aton("127.0.0.1")
        assert port != 0
        await stream.send_all(b"hello through the proxy")
        assert await receive_exactly(stream, 23) == b"hello through the proxy"
        await stream.aclose()
