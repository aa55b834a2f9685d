"""Run inside a network namespace by tests/test_egress.py (``ip netns exec NS python -m
tests.egress_netns PREFIX ORIGIN N``): a trisocks whose rule gives the IPv6 *PREFIX* as
egress, an origin on *ORIGIN* that records each connection's source, *N* CONNECT sessions,
one CONNECT to an IPv4 target (the rule has no IPv4 egress: REP 03), and the start-time check
for this prefix and for one no local route covers. Prints one JSON object."""

from __future__ import annotations

import functools
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio

from trisocks.admin.server import serve_with_admin
from trisocks.config import Config, Endpoint
from trisocks.policy import parse_rules
from trisocks.server.egress import check_egress
from trisocks.store.sqlite import Store


async def _request(proxy: tuple[str, int], atyp_addr: bytes, port: int) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream(*proxy)
    async with stream:
        await stream.send_all(b"\x05\x01\x00")
        assert await stream.receive_some(2) == b"\x05\x00"
        await stream.send_all(b"\x05\x01\x00" + atyp_addr + port.to_bytes(2, "big"))
        reply = b""
        while len(reply) < 10:  # the reply's address is IPv4 or IPv6: read what comes
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            reply += chunk
            if reply[3:4] == b"\x04" and len(reply) < 22:
                continue
            break
        rep = reply[1]
        body = b""
        if rep == 0:
            size = 22 if reply[3] == 4 else 10
            body = reply[size:]
            while chunk := await stream.receive_some(4096):
                body += chunk
        return rep, body


async def main(prefix: str, origin_host: str, sessions: int, db: Path) -> dict[str, Any]:
    import socket

    seen: list[str] = []
    egress: list[str] = []

    async def tell_peer(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.send_all(stream.socket.getpeername()[0].encode())

    rules = parse_rules([{"id": "pool6", "action": "allow", "egress": prefix}])
    config = Config(listen=(Endpoint("127.0.0.1", 0),), db=db, admin=None, auth=("none",),
                    rules=rules)
    unrouted = Config(listen=config.listen, db=db, admin=None, auth=("none",), rules=parse_rules(
        [{"id": "pool6", "action": "allow", "egress": "2001:db8:9::/64"}]))
    store = Store(db)
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(
                    functools.partial(trio.serve_tcp, tell_peer, 0, host=origin_host))
                port = listeners[0].socket.getsockname()[1]
                ctx = await nursery.start(serve_with_admin, config, store)
                proxy = ctx.listening[0][:2]

                all_ended = trio.Event()

                def record(event: str, session: Any) -> None:
                    if event == "end" and session.egress is not None:
                        egress.append(str(session.egress))
                        if len(egress) == sessions:
                            all_ended.set()

                ctx.registry.add_listener(record)
                target = b"\x04" + socket.inet_pton(socket.AF_INET6, origin_host)
                for _ in range(sessions):
                    rep, body = await _request(proxy, target, port)
                    assert rep == 0, rep
                    seen.append(body.decode())
                ipv4, _ = await _request(proxy, b"\x01\x7f\x00\x00\x01", port)
                with trio.fail_after(5):
                    await all_ended.wait()
                nursery.cancel_scope.cancel()
    finally:
        store.close()
    return {"seen": seen, "egress": egress, "ipv4": ipv4, "problems": check_egress(config),
            "unrouted_problems": check_egress(unrouted)}


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        report = trio.run(main, sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(tmp) / "t.db")
    print(json.dumps(report))
