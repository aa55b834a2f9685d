"""Load generators for the benchmarks, run as separate processes by bench.py.

``python benchmarks/loadgen.py MODE [options]`` speaks SOCKS5 by hand over plain
blocking sockets (greeting offering method 00, or 02 plus RFC 1929 auth when
``--user`` is given, then CONNECT to 127.0.0.1:``--target``), or connects
straight to the origin when ``--proxy`` is omitted. Every mode prints one JSON
object on stdout. Modes:

* ``bulk``: ``--streams`` connections each ask the origin's bulk service for
  an unbounded stream and ``recv_into`` one large reusable buffer; reports the
  bytes received inside the measurement window (after ``--warmup``) and the
  bytes received in total (for CPU-per-GiB accounting).
* ``connrate``: ``--clients`` threads each loop over connect, handshake,
  CONNECT, 4-byte request to the oneshot service, 4-byte response, the
  origin's close relayed by the proxy (EOF), close; reports
  the operations completed inside the window, and all completed ones
  (``total_completed``, warm-up included: bench.py divides the proxy's CPU
  over the whole run by it). All processes of one measurement
  share ``--start-at`` so their windows line up.
* ``rtt``: one connection to the echo service, ``--count`` 16-byte ping/pongs
  (or fewer if ``--duration`` runs out); reports p50 and p99 in microseconds.
* ``hold``: opens ``--count`` sessions to the echo service (one ping/pong each
  so the relay is established end to end), prints ``{"opened": n, ...}``, and
  keeps them idle until stdin is closed.

Every loop is bounded both by time and by a count.
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import resource
import socket
import ssl
import struct
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

ORIGIN_HOST = "127.0.0.1"
BULK_REQUEST = 10**13  # bytes asked of the bulk service: a stream the time window cuts off
RECV_BUFFER = 1 << 20
MAX_OPS_PER_CLIENT = 10**7
CONNECT_TIMEOUT = 10.0
HOLD_WORKERS = 4


class SocksError(Exception):
    pass


_TLS: list[ssl.SSLContext] = []


def tls_context() -> ssl.SSLContext:
    """The client side of ``--proxy-type socks5-tls``: what TLS costs is measured, not trust
    (the benchmark's certificate is a throwaway one), so the certificate is not checked."""
    if not _TLS:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        _TLS.append(context)
    return _TLS[0]


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise SocksError(f"connection closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def socks5_connect(sock: socket.socket, port: int, user: str | None, password: str | None) -> None:
    """Negotiate (RFC 1928/1929) and CONNECT to 127.0.0.1:port over an open socket."""
    method = 2 if user is not None else 0
    sock.sendall(bytes([5, 1, method]))
    version, chosen = recv_exact(sock, 2)
    if version != 5 or chosen != method:
        raise SocksError(f"server chose method {chosen:#x} (version {version})")
    if method == 2:
        u, p = user.encode(), (password or "").encode()
        sock.sendall(bytes([1, len(u)]) + u + bytes([len(p)]) + p)
        _, status = recv_exact(sock, 2)
        if status != 0:
            raise SocksError(f"authentication failed (status {status})")
    sock.sendall(
        b"\x05\x01\x00\x01" + ipaddress.IPv4Address(ORIGIN_HOST).packed + struct.pack("!H", port)
    )
    _, reply, _, atyp = recv_exact(sock, 4)
    if reply != 0:
        raise SocksError(f"CONNECT refused (reply {reply})")
    addr_len = {1: 4, 4: 16}.get(atyp) or recv_exact(sock, 1)[0]
    recv_exact(sock, addr_len + 2)


def http_connect(sock: socket.socket, port: int, user: str | None, password: str | None) -> None:
    """``CONNECT 127.0.0.1:port`` through an HTTP proxy (Basic auth with a user)."""
    auth = ""
    if user is not None:
        token = base64.b64encode(f"{user}:{password or ''}".encode()).decode()
        auth = f"Proxy-Authorization: Basic {token}\r\n"
    target = f"{ORIGIN_HOST}:{port}"
    sock.sendall(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n".encode())
    while True:  # peek, then take exactly the head: what follows it is the tunnel's
        seen = sock.recv(16384, socket.MSG_PEEK)
        if not seen:
            raise SocksError("HTTP proxy closed before its response head")
        end = seen.find(b"\r\n\r\n")
        if end >= 0:
            head = recv_exact(sock, end + 4)
            break
        if len(seen) >= 16384:
            raise SocksError("HTTP proxy response head too long")
        time.sleep(0.0005)
    status = head.split(b" ", 2)[1]
    if status != b"200":
        raise SocksError(f"CONNECT refused (HTTP {status.decode(errors='replace')})")


class Client:
    """How to reach the origin: through a SOCKS5 or HTTP proxy, or directly."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.proxy = args.proxy
        self.connect = http_connect if args.proxy_type == "http" else socks5_connect
        self.tls = args.proxy_type == "socks5-tls"
        self.user, self.password = args.user, args.password
        self.target = args.target

    def open(self) -> socket.socket:
        if self.proxy:
            host, port = self.proxy.rsplit(":", 1)
            address = (host.strip("[]"), int(port))
        else:
            address = (ORIGIN_HOST, self.target)
        sock = socket.create_connection(address, timeout=CONNECT_TIMEOUT)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls:  # the handshake is part of connecting, as for a real client
                sock = tls_context().wrap_socket(sock)
            if self.proxy:
                self.connect(sock, self.target, self.user, self.password)
        except BaseException:
            sock.close()
            raise
        return sock


def ping(sock: socket.socket, message: bytes) -> None:
    sock.sendall(message)
    if recv_exact(sock, len(message)) != message:
        raise SocksError("echo mismatch")


def run_threads(n: int, target: Callable[[int], None]) -> None:
    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def bulk(args: argparse.Namespace) -> dict:
    """Download throughput over --streams parallel connections."""
    client = Client(args)
    start = time.monotonic()
    window_start = start + args.warmup
    deadline = window_start + args.duration
    window_bytes = [0] * args.streams
    total_bytes = [0] * args.streams
    errors: list[str] = []

    def stream(i: int) -> None:
        view = memoryview(bytearray(RECV_BUFFER))
        try:
            with client.open() as sock:
                sock.sendall(b"%d\n" % BULK_REQUEST)
                total = window = 0
                while total < BULK_REQUEST:
                    n = sock.recv_into(view)
                    if not n:
                        raise SocksError("stream ended early")
                    now = time.monotonic()
                    if now >= deadline:
                        break
                    total += n
                    if now >= window_start:
                        window += n
                window_bytes[i], total_bytes[i] = window, total
        except (OSError, SocksError) as exc:
            errors.append(repr(exc))

    run_threads(args.streams, stream)
    return {
        "window_bytes": sum(window_bytes),
        "window_s": args.duration,
        "total_bytes": sum(total_bytes),
        "errors": errors,
    }


def connrate(args: argparse.Namespace) -> dict:
    """Complete connect/handshake/request/close cycles per second."""
    client = Client(args)
    time.sleep(max(0.0, args.start_at - time.time()))
    window_start = time.monotonic() + args.warmup
    deadline = window_start + args.duration
    completed = [0] * args.clients
    total = [0] * args.clients  # warm-up included: what the proxy's CPU over the run paid for
    errors = [0] * args.clients
    first_error: list[str] = []

    def loop(i: int) -> None:
        for _ in range(MAX_OPS_PER_CLIENT):
            if time.monotonic() >= deadline:
                return
            try:
                with client.open() as sock:
                    ping(sock, b"ping")
                    if sock.recv(1):
                        raise SocksError("data after the response instead of a close")
            except (OSError, SocksError) as exc:
                errors[i] += 1
                if not first_error:
                    first_error.append(repr(exc))
                time.sleep(0.001)
                continue
            total[i] += 1
            now = time.monotonic()
            if window_start <= now < deadline:
                completed[i] += 1

    run_threads(args.clients, loop)
    return {
        "completed": sum(completed),
        "total_completed": sum(total),
        "window_s": args.duration,
        "errors": sum(errors),
        "first_error": first_error[0] if first_error else None,
    }


def rtt(args: argparse.Namespace) -> dict:
    """Round-trip latency of 16-byte messages over one established connection."""
    client = Client(args)
    message = b"0123456789abcdef"
    samples: list[int] = []
    with client.open() as sock:
        for _ in range(min(args.count // 10, 1000)):
            ping(sock, message)
        deadline = time.monotonic() + args.duration
        for _ in range(args.count):
            t0 = time.perf_counter_ns()
            ping(sock, message)
            samples.append(time.perf_counter_ns() - t0)
            if time.monotonic() >= deadline:
                break
    samples.sort()

    def pct(q: float) -> float:
        return samples[round(q * (len(samples) - 1))] / 1000

    return {"p50_us": pct(0.50), "p99_us": pct(0.99), "samples": len(samples)}


def hold(args: argparse.Namespace) -> dict:
    """Open --count idle sessions; report, then keep them until stdin closes."""
    client = Client(args)
    deadline = time.monotonic() + args.duration
    stop = threading.Event()
    errors: list[str] = []

    def session() -> socket.socket:
        sock = client.open()
        try:
            ping(sock, b"hi")
        except BaseException:
            sock.close()
            raise
        return sock

    def open_some(n: int) -> list[socket.socket]:
        socks = []
        for _ in range(n):
            if stop.is_set():
                break
            if time.monotonic() >= deadline:
                errors.append(f"timed out after {args.duration:.0f} s")
                stop.set()
                break
            try:
                socks.append(session())
            except (OSError, SocksError) as exc:
                errors.append(repr(exc))
                stop.set()
        return socks

    share = [
        args.count // HOLD_WORKERS + (i < args.count % HOLD_WORKERS) for i in range(HOLD_WORKERS)
    ]
    with ThreadPoolExecutor(HOLD_WORKERS) as pool:
        held = [s for socks in pool.map(open_some, share) for s in socks]
    print(json.dumps({"opened": len(held), "errors": errors[:3]}), flush=True)
    sys.stdin.read()
    for sock in held:  # reset rather than close: no TIME_WAIT left to crowd later runs' ports
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    return {"closed": len(held)}


MODES = {"bulk": bulk, "connrate": connrate, "rtt": rtt, "hold": hold}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=MODES)
    parser.add_argument("--proxy", help="SOCKS5 server HOST:PORT; omit to go direct")
    parser.add_argument("--proxy-type", choices=["socks5", "http", "socks5-tls"],
                        default="socks5",
                        help="how --proxy is spoken (http: CONNECT; socks5-tls: SOCKS5 inside "
                             "TLS, the certificate not checked)")
    parser.add_argument("--user")
    parser.add_argument("--password")
    parser.add_argument("--target", type=int, required=True, help="origin port on 127.0.0.1")
    parser.add_argument("--duration", type=float, default=3.0, help="window (time bound) in s")
    parser.add_argument("--warmup", type=float, default=0.5)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--clients", type=int, default=1)
    parser.add_argument("--count", type=int, default=20000)
    parser.add_argument("--start-at", type=float, default=0.0, help="wall-clock start (epoch s)")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(json.dumps(MODES[args.mode](args)), flush=True)


if __name__ == "__main__":
    main()
