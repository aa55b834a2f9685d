"""SOCKS5-over-TLS bulk download throughput, beside plain SOCKS5 on the same server.

    python benchmarks/tls_throughput.py [--mb 1000] [--runs 3]

Starts the origin (origin.py) and ``trisocks serve`` (``auth = none``, one plain and one
``tls://`` listener on loopback, a throwaway ``trustme`` CA) as separate processes, then
downloads ``--mb`` MB through each listener with a blocking client (``ssl`` over a socket for
TLS) and prints MB/s (10^6 B/s), the best of ``--runs``. The client decrypts in this
process, so the number is bounded by one core for the server and one for the client.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def download(port: int, bulk_port: int, total: int, context: ssl.SSLContext | None) -> float:
    """Seconds to receive *total* bytes from the origin through the proxy on *port*."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock = context.wrap_socket(raw, server_hostname="127.0.0.1") if context else raw
    with sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton("127.0.0.1")
                     + bulk_port.to_bytes(2, "big"))
        reply = b""
        while len(reply) < 10:
            reply += sock.recv(10 - len(reply))
        assert reply[1] == 0, reply
        started = time.perf_counter()
        sock.sendall(b"%d\n" % total)
        got, buf = 0, bytearray(1 << 20)
        while got < total:
            n = sock.recv_into(buf)
            if not n:
                break
            got += n
        elapsed = time.perf_counter() - started
    assert got == total, (got, total)
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    total = args.mb * 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        ca = trustme.CA()
        cert = ca.issue_cert("127.0.0.1")
        key_file, cert_file = Path(tmp) / "key.pem", Path(tmp) / "cert.pem"
        cert.private_key_pem.write_to_path(str(key_file))
        cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
        context = ssl.create_default_context()
        ca.configure_trust(context)
        origin = subprocess.Popen([sys.executable, str(HERE / "origin.py")],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        plain, tls = free_port(), free_port()
        server = None
        try:
            assert origin.stdout is not None
            bulk_port = int(origin.stdout.readline().split()[1])
            server = subprocess.Popen(
                [sys.executable, "-m", "trisocks", "serve", "--auth", "none", "--admin", "off",
                 "--db", str(Path(tmp) / "t.db"), "--listen", f"127.0.0.1:{plain}",
                 "--listen", f"tls://127.0.0.1:{tls}", "--tls-cert", str(cert_file),
                 "--tls-key", str(key_file), "--log-level", "warning"],
                stdout=subprocess.DEVNULL,
            )
            wait_listening(plain)
            wait_listening(tls)
            for name, port, ctx in (("socks5", plain, None), ("socks5+tls", tls, context)):
                best = min(download(port, bulk_port, total, ctx) for _ in range(args.runs))
                print(f"{name:12} {total / best / 1e6:8.0f} MB/s  ({args.mb} MB, best of "
                      f"{args.runs}; TLS {ssl.OPENSSL_VERSION})" if ctx else
                      f"{name:12} {total / best / 1e6:8.0f} MB/s  ({args.mb} MB, best of "
                      f"{args.runs})")
        finally:
            for proc in (server, origin):
                if proc is not None:
                    proc.terminate()
                    proc.wait(timeout=10)


if __name__ == "__main__":
    main()
