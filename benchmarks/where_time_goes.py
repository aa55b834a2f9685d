"""Where trisocks spends its time per connection and its memory per idle session.

    python benchmarks/where_time_goes.py connections [--seconds S]   # cProfile of the server
    python benchmarks/where_time_goes.py connections --clients 64    # ... under 64 clients
    python benchmarks/where_time_goes.py idle [--sessions N]         # tracemalloc of idle sessions

Both run the server in this process (so the profilers see it) with password auth and the
admin API on, as users run it; clients and the echo origin are separate processes, so their
objects and CPU are not counted. ``connections`` prints the connection rate of one sequential
client (connect, RFC 1929 auth, CONNECT, 4-byte echo, close), the scheduler passes per
connection and the costliest functions. With ``--clients N`` (N > 1) the load is bench.py's
64-client rate run instead: N/32 (at least 1) ``loadgen.py connrate`` processes of up to 32
threads each, against origin.py's oneshot service (connect, RFC 1929 auth, CONNECT, 4-byte
request and reply, the origin closes); the profile then covers that run (``--seconds`` of
measurement after 0.5 s of warm-up) and lists the top functions by cumulative and by self time,
with the server's CPU per connection (under the profiler, so inflated). ``idle`` prints the
Python heap per idle established session (tracemalloc) and the allocation sites that hold it.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trisocks.admin.server import serve_with_admin
from trisocks.config import Config, Endpoint
from trisocks.passwords import hash_password
from trisocks.store.open import open_store
from trisocks.store.sqlite import Store

USER, PASSWORD = b"bench", b"benchpass"
HERE = Path(__file__).resolve().parent
THREADS_PER_LOADGEN = 32

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


async def _with_server(body, oneshot: bool = False):  # type: ignore[no-untyped-def]
    """Run *body(proxy_port, origin_port)* beside an in-process trisocks; the origin is the
    echo script above, or origin.py's oneshot service (*oneshot*, what loadgen.py expects)."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (20000, 20000))
    with tempfile.TemporaryDirectory() as tmp:
        plain = Store(Path(tmp) / "t.db")
        plain.add_user(USER.decode(), hash_password(PASSWORD))
        plain.close()
        # As `trisocks serve` opens it: the server reads a snapshot in memory (the cache),
        # not SQLite on every login.
        store = open_store(Path(tmp) / "t.db", serving=True)
        argv = [sys.executable, str(HERE / "origin.py")] if oneshot else [
            sys.executable, "-c", ECHO]
        echo = await trio.lowlevel.open_process(
            argv, stdin=subprocess.PIPE if oneshot else None, stdout=subprocess.PIPE
        )
        try:
            assert echo.stdout is not None
            line = b""
            while not line.endswith(b"\n"):
                line += await echo.stdout.receive_some(1)
            target = int(line.split()[3]) if oneshot else int(line)
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


def many_connections(seconds: float, clients: int) -> None:
    """The 64-client connection path under cProfile (module docstring)."""
    warmup = 0.5
    processes = max(1, clients // THREADS_PER_LOADGEN)
    results: list[dict] = []

    async def loadgen(port: int, target: int, threads: int, start_at: float) -> None:
        done = await trio.run_process(
            [sys.executable, str(HERE / "loadgen.py"), "connrate", "--target", str(target),
             "--proxy", f"127.0.0.1:{port}", "--user", USER.decode(),
             "--password", PASSWORD.decode(), "--clients", str(threads),
             "--duration", str(seconds), "--warmup", str(warmup), "--start-at", str(start_at)],
            capture_stdout=True,
        )
        results.append(json.loads(done.stdout.decode().strip().splitlines()[-1]))

    async def body(port: int, target: int) -> None:
        shares = [clients // processes + (i < clients % processes) for i in range(processes)]
        # One client first, so the login cache is warm as in bench.py (whose rate run follows
        # the bulk runs): otherwise the first 64 logins all pay scrypt at once under the profile.
        await trio.run_process([sys.executable, "-c", CLIENT, "rate", str(port), str(target),
                                "0.3"], capture_stdout=True)
        start_at = time.time() + 0.5  # the processes start together, as in bench.py
        profile = cProfile.Profile()
        cpu_before = time.process_time()
        profile.enable()
        with trio.fail_after(seconds + warmup + 60):
            async with trio.open_nursery() as nursery:
                for threads in shares:
                    nursery.start_soon(loadgen, port, target, threads, start_at)
        profile.disable()
        cpu = time.process_time() - cpu_before
        window = sum(r["completed"] for r in results)
        total = sum(r["total_completed"] for r in results)
        errors = sum(r["errors"] for r in results)
        stats = pstats.Stats(profile)
        passes = next(
            (v[1] for k, v in stats.stats.items() if k[2] == "unrolled_run"), 0  # type: ignore[attr-defined]
        )
        first = next((r["first_error"] for r in results if r["first_error"]), None)
        print(f"{clients} clients in {processes} load generator process(es): "
              f"{window / seconds:.0f} connections/s under cProfile (it slows the server ~2x); "
              f"{total} connections, {errors} errors{f' (first: {first})' if first else ''}; "
              f"{passes / max(total, 1):.1f} scheduler passes and "
              f"{cpu / max(total, 1) * 1e6:.0f} µs of this process's CPU per connection")
        print("\nTop functions by cumulative time:")
        stats.sort_stats("cumulative").print_stats(30)
        print("Top functions by self time:")
        stats.sort_stats("tottime").print_stats(30)

    trio.run(_with_server, body, True)


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
    conns = sub.add_parser("connections")
    conns.add_argument("--seconds", type=float, default=4.0)
    conns.add_argument("--clients", type=int, default=1,
                       help="concurrent clients (1: one sequential client; e.g. 64: bench.py's "
                            "rate run, loadgen.py processes of up to 32 threads)")
    sub.add_parser("idle").add_argument("--sessions", type=int, default=2000)
    args = parser.parse_args()
    if args.what == "connections" and args.clients > 1:
        many_connections(args.seconds, args.clients)
    elif args.what == "connections":
        connections(args.seconds)
    else:
        idle(args.sessions)


if __name__ == "__main__":
    main()
