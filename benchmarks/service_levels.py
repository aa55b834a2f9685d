"""Measure the service levels the test suite used to assert on the wall clock, and print them
as a table beside their targets.

    python benchmarks/service_levels.py [--rounds N]

The tests keep the correctness part (the sockets are closed, the realm's KDC is up, the rate is
never exceeded, the handshakes are all held and released); how fast or how small that is
depends on the machine and its load, so it is measured here instead:

* admin kill: DELETE /api/sessions/<id> until the proxy's sockets of that session are closed
  (CONNECT; target 0.1 s);
* KDC setup: a throwaway Kerberos realm created and its KDC answering (tests/krb.py; target 1 s;
  skipped without the MIT Kerberos programs);
* bandwidth: the steady download rate of a user limited to 2 MiB/s, splice and copy engines
  (target within 10 % of the limit);
* half-open handshake memory: Python heap (tracemalloc) per held, incomplete SOCKS5 greeting,
  both ends of the loopback connection (target under 32 KiB).

Everything runs on loopback inside this process, on port 0, and is stopped at the end.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import trio
import trio.testing

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import krb
from tests.admin_support import ADMIN, TOKEN, admin_url, socket_count
from tests.conftest import (
    BLOB,
    PASSWORD,
    USER,
    _echo,
    _serve_blob,
    connect_request,
    eventually,
    make_config,
    open_connect,
    read_reply,
    socks_handshake,
)
from trisocks.admin.server import serve_with_admin
from trisocks.passwords import hash_password
from trisocks.policy.quotas import UserLimits
from trisocks.server.context import ServerContext
from trisocks.store.sqlite import Store

Row = tuple[str, str, str, bool]  # what, measured, target, met


async def _serve_on(nursery: trio.Nursery, handler: Callable[..., Any]) -> tuple[str, int]:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[:2]  # type: ignore[no-any-return]


async def _start_proxy(nursery: trio.Nursery, store: Store, db: Path, **overrides: Any) -> Any:
    ctx: ServerContext = await nursery.start(serve_with_admin, make_config(db, **overrides), store)
    return ctx


async def admin_kill(store: Store, db: Path, rounds: int) -> Row:
    seconds = []
    async with trio.open_nursery() as nursery:
        echo = await _serve_on(nursery, _echo)
        ctx = await _start_proxy(nursery, store, db, admin=ADMIN, admin_token=TOKEN)
        proxy = ctx.listening[0][:2]
        headers = {"Authorization": f"Bearer {TOKEN}"}
        holder = type("P", (), {"ctx": ctx})()
        async with httpx.AsyncClient(base_url=admin_url(holder), headers=headers) as api:
            await api.get("/healthz")
            for _ in range(rounds):
                sockets = socket_count()
                stream = await open_connect(proxy, echo)
                await stream.send_all(b"ping")
                await stream.receive_some(4)
                async def listed() -> list[dict[str, Any]]:
                    return (await api.get("/api/sessions")).json()["sessions"]  # type: ignore[no-any-return]

                (session,) = await eventually(listed, limit=10)
                started = time.perf_counter()
                await api.delete(f"/api/sessions/{session['id']}")
                # Only this client's socket is left.
                left = sockets + 1

                def closed(n: int = left) -> bool:
                    return socket_count() == n

                await eventually(closed, limit=10, interval=0.001)
                seconds.append(time.perf_counter() - started)
                await stream.aclose()
                await eventually(lambda: not ctx.registry.select(), limit=10, interval=0.001)
        nursery.cancel_scope.cancel()
    p50, worst = statistics.median(seconds), max(seconds)
    return ("admin kill, sockets closed", f"p50 {p50 * 1000:.1f} ms, max {worst * 1000:.1f} ms",
            "< 100 ms", worst < 0.1)


def kdc_setup() -> Row:
    if not all(krb._which(p) for p in ("kdb5_util", "kadmin.local", "krb5kdc")):
        return ("KDC setup", "skipped (no MIT Kerberos programs)", "< 1 s", True)
    with tempfile.TemporaryDirectory() as directory:
        realm = krb.start_realm(Path(directory))
        realm.stop()
    return ("KDC setup", f"{realm.setup_seconds * 1000:.0f} ms", "< 1 s", realm.setup_seconds < 1)


async def bandwidth(store: Store, db: Path, engine: str) -> Row:
    rate = 2 << 20
    store.set_user_limits(USER, UserLimits(rate_down=rate))
    async with trio.open_nursery() as nursery:
        origin = await _serve_on(nursery, functools.partial(_serve_blob, BLOB))
        ctx = await _start_proxy(nursery, store, db, relay_engine=engine)
        stream = await trio.open_tcp_stream(*ctx.listening[0][:2])
        await socks_handshake(stream, USER, PASSWORD)
        await stream.send_all(connect_request(*origin))
        assert (await read_reply(stream))[0] == 0
        await stream.send_all(b"GET /blob HTTP/1.1\r\nHost: x\r\n\r\n")
        total, started, at = 0, 0.0, 0
        while chunk := await stream.receive_some(65536):
            total += len(chunk)
            if not started and total >= 1 << 20:  # past the burst: the steady state
                started, at = time.perf_counter(), total
        measured = (total - at) / (time.perf_counter() - started)
        await stream.aclose()
        nursery.cancel_scope.cancel()
    store.set_user_limits(USER, UserLimits())
    ratio = measured / rate
    return (f"bandwidth at 2 MiB/s ({engine})", f"{ratio * 100:.1f} % of the limit",
            "90-110 %", 0.9 <= ratio <= 1.1)


async def half_open_memory(store: Store, db: Path, count: int = 1000) -> Row:
    async with trio.open_nursery() as nursery:
        ctx = await _start_proxy(nursery, store, db, handshake_timeout=30.0,
                                 max_handshakes_per_client=None)
        host, port = ctx.listening[0][:2]
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            streams = []
            for _ in range(count):
                stream = await trio.open_tcp_stream(host, port)
                await stream.send_all(b"\x05\x02\x02")  # a greeting missing its last method
                streams.append(stream)
            await eventually(lambda: ctx.admission.handshakes == count, limit=30)
            await trio.testing.wait_all_tasks_blocked()
            per_connection = (tracemalloc.get_traced_memory()[0] - before) / count
        finally:
            tracemalloc.stop()
        for stream in streams:
            await stream.aclose()
        nursery.cancel_scope.cancel()
    return ("half-open handshake heap", f"{per_connection / 1024:.1f} KiB each", "< 32 KiB",
            per_connection < 32 * 1024)


async def measure(rounds: int) -> list[Row]:
    with tempfile.TemporaryDirectory() as directory:
        db = Path(directory) / "trisocks.db"
        store = Store(db)
        store.add_user(USER, hash_password(PASSWORD.encode()))
        try:
            rows = [await admin_kill(store, db, rounds), kdc_setup()]
            for engine in ("splice", "copy"):
                rows.append(await bandwidth(store, db, engine))
            rows.append(await half_open_memory(store, db))
        finally:
            store.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="admin kills to time")
    args = parser.parse_args()
    rows = trio.run(measure, args.rounds)
    widths = [max(len(str(r[i])) for r in rows) for i in range(3)]
    head = ("service level", "measured", "target")
    print("  ".join(f"{h:<{w}}" for h, w in zip(head, widths, strict=True)) + "  met")
    for what, measured, target, met in rows:
        print(f"{what:<{widths[0]}}  {measured:<{widths[1]}}  {target:<{widths[2]}}  "
              f"{'yes' if met else 'NO'}")
    return 0 if all(r[3] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
