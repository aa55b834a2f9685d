"""Where trisocks spends its time per connection and its memory per idle session.

    python benchmarks/where_time_goes.py connections [--seconds S]   # cProfile of the server
    python benchmarks/where_time_goes.py idle [--sessions N]         # tracemalloc of idle sessions

Both run the server in this process (so the profilers see it) with password auth and the
admin API on, as users run it; clients and the echo origin are separate processes, so their
objects and CPU are not counted. ``connections`` prints the connection rate of one sequential
client (connect, RFC 1929 auth, CONNECT, 4-byte echo, close), the scheduler passes per
connection and the costliest functions; ``idle`` prints the Python heap per idle established
session (tracemalloc) and the allocation sites that hold it.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import resource
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trisocks.admin.server import serve_with_admin
from trisocks.config import Config, Endpoint
from trisocks.passwords import hash_password
from trisocks.store.sqlite import Store

USER, PASSWORD = b"bench", b"benchpass"

# The echo origin and the clients: plain blocking sockets in another process.
ECHO = r"""
import socket, sys, threading
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(4096)
print(s.getsockname()[1], flush=True)
def serve(c):
    try:
        while d := c.recv(65536): c.sendall(d)
    except OSError: pass
    c.close()
while True:
    c, _ = s.accept(); threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = r"""
import socket, sys, time, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
mode, port, target, amount = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
def rx(s, n):
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk: raise SystemExit("proxy closed the connection")
        got += chunk
def session():
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"\x05\x01\x02"); rx(s, 2)
    s.sendall(b"\x01\x05bench\x09benchpass"); rx(s, 2)
    s.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + target.to_bytes(2, "big")); rx(s, 10)
    s.sendall(b"ping"); rx(s, 4)
    return s
if mode == "rate":
    n, end = 0, time.monotonic() + amount
    while time.monotonic() < end:
        session().close(); n += 1
    print(n, flush=True)
else:
    held = [session() for _ in range(int(amount))]
    print("ready", flush=True)
    sys.stdin.read()
"""


async def _with_server(body):  # type: ignore[no-untyped-def]
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "t.db")
        store.add_user(USER.decode(), hash_password(PASSWORD))
        echo = await trio.lowlevel.open_process(
            [sys.executable, "-c", ECHO], stdout=subprocess.PIPE
        )
        try:
            assert echo.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                line += await echo.stdout.receive_some(1)
            target = int(line)
            config = Config(
                listen=(Endpoint("127.0.0.1", 0),), admin=Endpoint("127.0.0.1", 0),
                admin_token="profile-token-0123456789", db=Path(tmp) / "t.db",
                log_level="warning",
            )
            async with trio.open_nursery() as nursery:
                ctx = await nursery.start(serve_with_admin, config, store)
                await body(ctx.listening[0][1], target)
                nursery.cancel_scope.cancel()
        finally:
            echo.kill()
            await echo.wait()
            store.close()


def connections(seconds: float) -> None:
    async def body(port: int, target: int) -> None:
        profile = cProfile.Profile()
        profile.enable()
        done = await trio.run_process(
            [sys.executable, "-c", CLIENT, "rate", str(port), str(target), str(seconds)],
            capture_stdout=True,
        )
        profile.disable()
        count = int(done.stdout)
        stats = pstats.Stats(profile)
        passes = next(
            (v[1] for k, v in stats.stats.items() if k[2] == "unrolled_run"), 0  # type: ignore[attr-defined]
        )
        print(f"{count / seconds:.0f} connections/s under cProfile (it slows everything ~2x); "
              f"{passes / max(count, 1):.1f} scheduler passes per connection")
        stats.sort_stats("tottime").print_stats(25)

    trio.run(_with_server, body)


def idle(sessions: int) -> None:
    async def hold(port: int, target: int) -> trio.Process:
        client = await trio.lowlevel.open_process(
            [sys.executable, "-c", CLIENT, "hold", str(port), str(target), str(sessions)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )
        assert client.stdout is not None
        buffered = b""
        while b"ready" not in buffered:
            buffered += await client.stdout.receive_some()
        await trio.sleep(0.5)
        gc.collect()
        return client

    async def body(port: int, target: int) -> None:
        # A first batch warms the allocator up (handshake garbage, pools); the second one,
        # under tracemalloc, shows what an idle session holds. For RSS per session beside the
        # peers, see bench.py.
        warm = await hold(port, target)
        tracemalloc.start(1)
        before = tracemalloc.take_snapshot()
        traced_client = await hold(port, target)
        stats = tracemalloc.take_snapshot().compare_to(before, "lineno")
        traced = sum(s.size_diff for s in stats)
        print(f"{sessions} idle sessions: {traced / sessions:.0f} B of Python heap per session; "
              "biggest allocation sites:")
        for s in stats[:25]:
            frame = s.traceback[0]
            where = frame.filename.split("site-packages/")[-1]
            print(f"  {s.size_diff / sessions:7.1f} B  {s.count_diff / sessions:5.2f} objects  "
                  f"{where}:{frame.lineno}")
        for client in (warm, traced_client):
            client.kill()
            await client.wait()

    trio.run(_with_server, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    sub.add_parser("connections").add_argument("--seconds", type=float, default=4.0)
    sub.add_parser("idle").add_argument("--sessions", type=int, default=2000)
    args = parser.parse_args()
    if args.what == "connections":
        connections(args.seconds)
    else:
        idle(args.sessions)


if __name__ == "__main__":
    main()
