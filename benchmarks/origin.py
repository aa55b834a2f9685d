"""Origin server for the benchmarks: the thing every proxy connects to.

Runs as its own process (``python benchmarks/origin.py``) and serves four
loopback TCP services, then prints
``READY <bulk_port> <echo_port> <oneshot_port> <bursty_port>``:

* bulk: the client sends one ASCII line with a byte count (``"12345\\n"``);
  the server sends that many bytes as fast as it can (``sendall`` of slices of
  one preallocated buffer, one thread per connection), then closes.
* bursty: the same request, answered in paced bursts as a remote server over a
  real network sends: a burst of :data:`BURST_MIN`..:data:`BURST_MAX` bytes
  (one ``sendall``), then a pause of :data:`GAP_MIN`..:data:`GAP_MAX` seconds,
  sizes and pauses drawn uniformly from a fixed-seed generator (the same
  sequence every run), one thread per connection. The proxy thus sees many
  partly filled reads instead of a socket that is always full.
* echo: everything received is sent back unchanged until the client closes.
* oneshot: the first message received is sent back, then the server closes.
  Closing first puts the TIME_WAIT state on the origin's listening port, so
  thousands of short connections per second do not use up the proxies'
  ephemeral ports (Dante, which binds before it connects, fails without this).

A single ``selectors`` loop serves echo and oneshot, so thousands of idle
connections cost the origin one socket each and no thread.

The process exits when its stdin is closed or on SIGTERM.
"""

from __future__ import annotations

import errno
import os
import random
import resource
import selectors
import signal
import socket
import sys
import threading
import time

CHUNK = 4 << 20  # bytes per sendall() in the bulk service
BURST_MIN, BURST_MAX = 16 << 10, 64 << 10  # bytes per burst of the bursty service
GAP_MIN, GAP_MAX = 100e-6, 400e-6  # seconds between two bursts
BURST_SEED = 17
MAX_REQUEST_LINE = 64
BACKLOG = 4096


def raise_nofile_limit() -> int:
    """Raise the soft open-files limit to the hard limit; return the new soft limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def listen(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, 0))
    sock.listen(BACKLOG)
    return sock


def read_count(conn: socket.socket) -> int | None:
    """Read the bulk request line; None if the client closed or sent garbage."""
    line = b""
    while b"\n" not in line and len(line) < MAX_REQUEST_LINE:
        data = conn.recv(MAX_REQUEST_LINE)
        if not data:
            return None
        line += data
    try:
        return int(line.split(b"\n", 1)[0])
    except ValueError:
        return None


def serve_bulk_connection(conn: socket.socket, payload: memoryview) -> None:
    """Send the requested number of bytes; a client hanging up early is normal."""
    with conn:
        try:
            remaining = read_count(conn)
            while remaining:
                n = min(remaining, len(payload))
                conn.sendall(payload[:n])
                remaining -= n
        except OSError:
            pass


def serve_bursty_connection(conn: socket.socket, payload: memoryview) -> None:
    """Send the requested number of bytes in paced bursts (module docstring)."""
    rng = random.Random(BURST_SEED)
    with conn:
        try:
            remaining = read_count(conn)
            while remaining:
                n = min(remaining, rng.randint(BURST_MIN, BURST_MAX))
                conn.sendall(payload[:n])
                remaining -= n
                time.sleep(rng.uniform(GAP_MIN, GAP_MAX))
        except OSError:
            pass


def bulk_accept_loop(server: socket.socket, serve=serve_bulk_connection) -> None:
    payload = memoryview(bytearray(b"x" * CHUNK))
    while True:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threading.Thread(target=serve, args=(conn, payload), daemon=True).start()


class EchoServer:
    """Non-blocking echo and oneshot services on one selector.

    Pending output is buffered per socket; oneshot sockets are closed once their
    first reply is fully sent.
    """

    def __init__(self, echo: socket.socket, oneshot: socket.socket) -> None:
        self.selector = selectors.DefaultSelector()
        self.listeners = {echo: False, oneshot: True}  # listener -> close after first reply
        self.pending: dict[socket.socket, bytes] = {}
        self.oneshot: set[socket.socket] = set()
        for listener in self.listeners:
            listener.setblocking(False)
            self.selector.register(listener, selectors.EVENT_READ)

    def run(self, stop_fd: int) -> None:
        self.selector.register(stop_fd, selectors.EVENT_READ)
        while True:
            for key, events in self.selector.select():
                if key.fileobj == stop_fd:
                    if not os.read(stop_fd, 1):
                        return
                elif key.fileobj in self.listeners:
                    self.accept(key.fileobj)
                elif events & selectors.EVENT_WRITE:
                    self.flush(key.fileobj)
                else:
                    self.echo(key.fileobj)

    def accept(self, listener: socket.socket) -> None:
        for _ in range(64):  # bounded batch, then let other sockets run
            try:
                conn, _ = listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:  # e.g. EMFILE: keep serving the connections we have
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    print(f"origin: accept failed: {exc}", file=sys.stderr)
                return
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.selector.register(conn, selectors.EVENT_READ)
            if self.listeners[listener]:
                self.oneshot.add(conn)

    def close(self, conn: socket.socket) -> None:
        self.selector.unregister(conn)
        self.pending.pop(conn, None)
        self.oneshot.discard(conn)
        conn.close()

    def echo(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close(conn)
            return
        self.send(conn, data)

    def send(self, conn: socket.socket, data: bytes) -> None:
        try:
            sent = conn.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self.close(conn)
            return
        if sent < len(data):
            self.pending[conn] = data[sent:]
            self.selector.modify(conn, selectors.EVENT_WRITE)
        elif conn in self.oneshot:
            self.close(conn)

    def flush(self, conn: socket.socket) -> None:
        data = self.pending.pop(conn)
        self.selector.modify(conn, selectors.EVENT_READ)
        self.send(conn, data)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    raise_nofile_limit()
    bulk, echo, oneshot, bursty = listen(), listen(), listen(), listen()
    threading.Thread(target=bulk_accept_loop, args=(bulk,), daemon=True).start()
    threading.Thread(
        target=bulk_accept_loop, args=(bursty, serve_bursty_connection), daemon=True
    ).start()
    ports = " ".join(str(s.getsockname()[1]) for s in (bulk, echo, oneshot, bursty))
    print(f"READY {ports}", flush=True)
    EchoServer(echo, oneshot).run(sys.stdin.fileno())


if __name__ == "__main__":
    main()
