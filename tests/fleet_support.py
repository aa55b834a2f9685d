"""Real PostgreSQL, HAProxy and ``trisocks serve`` processes for the fleet tests (no tests here;
the fixtures ``postgres`` and ``pg_url`` are imported by name).

Rules on top of conftest's:

1. The programs come from Debian packages (``postgresql``, ``haproxy``; scripts/test installs
   them). A missing one FAILS the test with the package to install: the fleet is what these
   tests are about, so a silent skip would hide that nothing was tested.
2. Every server listens on 127.0.0.1 on a free port, keeps its files in a fresh temporary
   directory, runs in the foreground as our child, and is stopped and reaped by its fixture.
3. PostgreSQL refuses to run as root: as root, the cluster is created and run as the
   ``postgres`` user the package adds (``Popen(user=...)``, no ``su`` in between, so our
   signals reach it directly).
"""

from __future__ import annotations

import contextlib
import glob
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

TOKEN = "fleet-token-0123456789"
START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def program(name: str, package: str, pattern: str | None = None) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(pattern or ""), reverse=True)), None)
    if not found:
        pytest.fail(f"{name} is not installed: these tests need the Debian package {package!r} "
                    f"(scripts/test installs it; or: apt-get install {package})")
    return found


def wait_for(ready: Any, proc: subprocess.Popen[Any], what: str, log: Path) -> None:
    """Poll *ready()* until true; fail with *log*'s tail if *proc* exits or time runs out."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(OSError):
            if ready():
                return
        time.sleep(0.05)
    pytest.fail(f"{what} did not start within {START_TIMEOUT}s:\n{log.read_text()[-3000:]}")


def accepts(port: int) -> bool:
    socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
    return True


def stop(proc: subprocess.Popen[Any], what: str, timeout: float = 20.0) -> int:
    """SIGTERM, wait, and reap (SIGKILL after *timeout*, which fails the test)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{what} did not stop within {timeout}s of SIGTERM")


@contextlib.contextmanager
def server_dir(prefix: str, owner: str | None = None) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if owner is not None:
        shutil.chown(path, owner, owner)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def run_postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster; yields ``postgresql://trisocks@127.0.0.1:PORT``."""
    initdb = program("initdb", "postgresql", "/usr/lib/postgresql/*/bin/initdb")
    postgres = str(Path(initdb).with_name("postgres"))
    as_user: dict[str, Any] = {"user": "postgres", "group": "postgres"} if os.geteuid() == 0 else {}
    with server_dir("trisocks-pg-", "postgres" if as_user else None) as root:
        log = root / "postgres.log"
        subprocess.run([initdb, "-D", str(root / "data"), "-A", "trust", "-U", "trisocks",
                        "-E", "UTF8", "--no-sync"], check=True, capture_output=True, **as_user)
        port = free_port()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [postgres, "-D", str(root / "data"), "-p", str(port), "-k", str(root),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
                stdout=out, stderr=subprocess.STDOUT, **as_user,
            )
        try:
            url = f"postgresql://trisocks@127.0.0.1:{port}"
            wait_for(lambda: _pg_ready(f"{url}/postgres"), proc, "postgres", log)
            yield url
        finally:
            stop(proc, "postgres")


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """One PostgreSQL server for the whole run (tests take a database each: ``pg_url``)."""
    with run_postgres() as url:
        yield url


@pytest.fixture
def pg_url(postgres: str) -> Iterator[str]:
    with new_database(postgres) as url:
        yield url


def _pg_ready(url: str) -> bool:
    import psycopg

    try:
        psycopg.connect(url, connect_timeout=1).close()
    except psycopg.OperationalError:
        return False
    return True


@contextlib.contextmanager
def new_database(server_url: str) -> Iterator[str]:
    """A fresh database on *server_url*, dropped afterwards (connections and all)."""
    import psycopg

    name = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(f"{server_url}/postgres", autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    try:
        yield f"{server_url}/{name}"
    finally:
        with psycopg.connect(f"{server_url}/postgres", autocommit=True) as conn:
            conn.execute(f"DROP DATABASE {name} WITH (FORCE)")


HAPROXY_CONFIG = """\
global
    maxconn 2000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend socks
    bind 127.0.0.1:{port}
    default_backend trisocks
backend trisocks
    balance roundrobin
{servers}
"""


@contextlib.contextmanager
def run_haproxy(backends: list[int]) -> Iterator[int]:
    """HAProxy in TCP mode in front of trisocks listeners on *backends* (ports), each sent a
    PROXY v2 header; yields the port clients connect to."""
    haproxy = program("haproxy", "haproxy")
    with server_dir("trisocks-haproxy-") as root:
        port = free_port()
        servers = "\n".join(f"    server t{i} 127.0.0.1:{p} send-proxy-v2"
                            for i, p in enumerate(backends))
        config = root / "haproxy.cfg"
        config.write_text(HAPROXY_CONFIG.format(port=port, servers=servers))
        log = root / "haproxy.log"
        with open(log, "wb") as out:  # -db: foreground, no daemon
            proc = subprocess.Popen([haproxy, "-db", "-f", str(config)],
                                    stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: accepts(port), proc, "haproxy", log)
            yield port
        finally:
            stop(proc, "haproxy")


@attrs.define
class Trisocks:
    """A ``trisocks serve`` process (its workers, if any, are its children)."""

    proc: subprocess.Popen[Any]
    port: int
    admin_url: str
    log: Path

    def log_text(self) -> str:
        return self.log.read_text()


@contextlib.contextmanager
def run_trisocks(workdir: Path, db: str, *flags: str, workers: int = 1) -> Iterator[Trisocks]:
    """``trisocks serve`` behind HAProxy (``--proxy-protocol``) with its admin API; ready once
    each worker logs that it listens. Stopped with SIGTERM, which must end it with status 0."""
    port, admin = free_port(), free_port()
    log = workdir / f"trisocks-{port}.log"
    argv = [sys.executable, "-m", "trisocks", "serve", "--listen", f"127.0.0.1:{port}",
            "--admin", f"127.0.0.1:{admin}", "--admin-token", TOKEN, "--db", db,
            "--proxy-protocol", "--accounting-flush-interval", "0.2", "--workers", str(workers),
            *flags]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        wait_for(lambda: log.read_text().count("fleet: instance") >= workers
                 and log.read_text().count("listening on") >= workers and accepts(admin),
                 proc, "trisocks", log)
        yield Trisocks(proc, port, f"http://127.0.0.1:{admin}", log)
    finally:
        status = stop(proc, "trisocks")
    assert status == 0, log.read_text()[-3000:]
