"""Login latency per password backend (issue 14): median and p99 of full SOCKS5 logins.

    python benchmarks/logins.py [--n 200] [--quick] [--only store,ldap,http,pam] [--markdown FILE]

For every scenario a fresh ``trisocks serve`` runs on loopback as users run it (password auth,
admin API on, accounting to a fresh SQLite db, log level warning) with ``--password-backends``
set to the one backend measured. A client in this process then makes ``--n`` logins one after
another, each on a new TCP connection: connect, greeting offering method 02, RFC 1929
user/password, the server's status. The time of one login runs from just before ``connect`` to
the status byte (a refusal aborts the run); the client then closes without a request.

Scenarios (``cache``: whether the login may be answered from memory):

* ``store`` cold: ``--n`` distinct users, each logging in once, so every login pays a full
  scrypt check at the production cost. The users' hashes are made here with
  ``trisocks.passwords`` as shipped (never the test suite's cheap cost); the run reads the cost
  back from the db and refuses to go on unless it is the production one.
* ``store`` cached: one user logging in again with the same password (the keyed digest the
  store backend keeps after a successful check).
* ``ldap`` cold, direct bind and search-then-bind: a throwaway ``slapd`` on loopback
  (tests/ldap_support.py), ``auth_cache_ttl`` 1 µs, so every login goes to the directory;
  ``ldap`` cached: the default ``auth_cache_ttl`` (60 s), so only the first one does.
* ``http`` cold and cached: a local hook (tests/hook_support.py, trio + h11, its own process),
  the same two cache settings.
* ``pam`` cold and cached, as root only: a throwaway system user (``useradd``, ``chpasswd``)
  and a throwaway service ``/etc/pam.d/trisocks-bench-*`` with the stack shipped in
  deploy/pam.d/trisocks, both removed afterwards. Not root: a line says why it is skipped.

Each scenario first makes a few unmeasured warm-up logins (``WARMUP``; for cached scenarios the
first one fills the cache). After it, the server's ``/metrics`` (``trisocks_logins``, logins a
backend accepted itself) shows how many logins reached the backend: cold scenarios must show
every one, cached ones one; the "backend answered" column says what it showed.

Every step is bounded: a login times out after 10 s, a server must accept within 20 s, and each
scenario makes at most ``--n`` + ``WARMUP`` logins.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import secrets
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import peers
import procs
import report

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

WARMUP = 5
LOGIN_TIMEOUT = 10.0
TINY_TTL = "0.000001"  # auth_cache_ttl of the cold external scenarios: every login misses
COLD = {"auth_cache_ttl": TINY_TTL}
"""Config file keys of the cold external scenarios. In a TOML file, not a flag: `serve` does not
parse ``--auth-cache-ttl`` as a number yet (exits 2: "expected a number of seconds")."""
PRODUCTION_LOG2_N = 14  # trisocks.passwords' cost as shipped; a store hash must carry it
HOOK_USER, HOOK_PASSWORD = "hookuser", "hook-bench-pass"

HOOK_SERVER = r"""
import sys, trio
import hook_support

async def main():
    async with trio.open_nursery() as nursery:
        hook = await hook_support.start_hook(nursery)
        hook.users = {sys.argv[1]: (sys.argv[2], sys.argv[1], ["staff"])}
        print(hook.url, flush=True)
        await trio.sleep_forever()

trio.run(main)
"""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Scenario:
    backend: str  # the password_backends value, and the trisocks_logins label
    cache: str  # "cold" / "cached", as printed
    flags: list[str]  # extra `trisocks serve` flags
    credentials: Callable[[int], tuple[str, str]]  # login number (0.. warm-up first) -> user, pw
    variant: str = ""  # e.g. "direct bind"
    expect_backend: str = "all"  # "all": every login reaches the backend; "one": only the first
    config: dict[str, str] = field(default_factory=dict)  # TOML keys -> literal values

    @property
    def label(self) -> str:
        return f"{self.backend} ({self.variant})" if self.variant else self.backend


@dataclass
class Row:
    label: str
    cache: str
    samples_ms: list[float] = field(default_factory=list)
    answered: str = ""
    error: str = ""


def login(port: int, user: str, password: str) -> float:
    """One full login; its latency in ms (connect to the RFC 1929 status)."""
    u, p = user.encode(), password.encode()
    t0 = time.perf_counter_ns()
    with socket.create_connection(("127.0.0.1", port), timeout=LOGIN_TIMEOUT) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(b"\x05\x01\x02")
        if recv_exact(sock, 2) != b"\x05\x02":
            raise RuntimeError("the server did not choose username/password (method 02)")
        sock.sendall(bytes([1, len(u)]) + u + bytes([len(p)]) + p)
        status = recv_exact(sock, 2)[1]
        elapsed = time.perf_counter_ns() - t0
    if status != 0:
        raise RuntimeError(f"login of {user!r} refused (RFC 1929 status {status})")
    return elapsed / 1e6


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise RuntimeError(f"the server closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def metrics_logins(admin_port: int) -> dict[tuple[str, str], float]:
    """``(backend, result) -> count`` from the server's ``/metrics`` (``trisocks_logins``)."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{admin_port}/metrics",
        headers={"Authorization": f"Bearer {peers.ADMIN_TOKEN}"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        text = response.read().decode()
    counts: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        match = re.match(r"trisocks_logins(?:_total)?\{([^}]*)\}\s+(\S+)", line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
            counts[(labels.get("backend", "?"), labels.get("result", "?"))] = float(
                match.group(2))
    return counts


@contextlib.contextmanager
def trisocks(workdir: Path, backend: str, flags: list[str], users: dict[str, str] | None = None,
             config: dict[str, str] | None = None) -> Iterator[tuple[int, int]]:
    """A `trisocks serve` with *backend* as its only password backend; yields (socks, admin)
    ports. *users* (name -> scrypt hash) are written into its fresh db first; *config* (key ->
    TOML literal) goes into a config file."""
    cmd = peers.trisocks_command()
    if cmd is None:
        raise RuntimeError("no trisocks executable")
    sdir = Path(tempfile.mkdtemp(prefix=f"logins-{backend}-", dir=workdir))
    db = sdir / "trisocks.db"
    if users:
        from trisocks.store.sqlite import Store

        store = Store(db)
        try:
            for name, password_hash in users.items():
                store.add_user(name, password_hash)
        finally:
            store.close()
    port, admin = procs.free_port(), procs.free_port()
    argv = [*cmd, "serve", "--listen", f"127.0.0.1:{port}", "--auth", "password",
            "--db", str(db), "--admin", f"127.0.0.1:{admin}", "--admin-token", peers.ADMIN_TOKEN,
            "--log-level", "warning", "--password-backends", backend, *flags]
    if config:
        (sdir / "bench.toml").write_text("".join(f"{k} = {v}\n" for k, v in config.items()))
        argv += ["--config", str(sdir / "bench.toml")]
    with open(sdir / "stderr", "wb") as err:
        proc = procs.start(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, cwd=REPO)
    try:
        try:
            procs.wait_accepting(port, proc)
            procs.wait_accepting(admin, proc)
        except RuntimeError as exc:
            output = (sdir / "stderr").read_text(errors="replace").strip()[-300:]
            raise RuntimeError(f"{exc}: {output} (command: {shlex.join(argv)})") from None
        yield port, admin
    finally:
        procs.stop(proc)


def measure(scenario: Scenario, n: int, workdir: Path, users: dict[str, str] | None = None
            ) -> Row:
    row = Row(scenario.label, scenario.cache)
    try:
        with trisocks(workdir, scenario.backend, scenario.flags, users, scenario.config) as (
                port, admin):
            for i in range(WARMUP):
                login(port, *scenario.credentials(i))
            for i in range(WARMUP, WARMUP + n):
                row.samples_ms.append(login(port, *scenario.credentials(i)))
            counts = metrics_logins(admin)
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        row.error = " ".join(str(exc).split())[:300]
        log(f"  {scenario.label} {scenario.cache}: FAILED: {row.error}")
        return row
    accepted = counts.get((scenario.backend, "accepted"))
    total = WARMUP + n
    if accepted is None:
        row.answered = "? (no trisocks_logins in /metrics)"
    else:
        want = total if scenario.expect_backend == "all" else 1
        row.answered = f"{accepted:.0f}/{total}" + ("" if accepted == want else
                                                    f" (expected {want}!)")
    log(f"  {scenario.label} {scenario.cache}: median {statistics.median(row.samples_ms):.2f} ms"
        f", backend answered {row.answered}")
    return row


# --- store ---------------------------------------------------------------------------------

def store_users(count: int) -> dict[str, str]:
    """*count* users (``cold0``..), each with its own password, hashed at the production cost."""
    import trisocks.passwords as passwords

    if passwords._LOG2_N != PRODUCTION_LOG2_N:  # the shipped cost, nothing patched it
        raise RuntimeError(f"trisocks.passwords hashes with log2 n = {passwords._LOG2_N}, "
                           f"not the production {PRODUCTION_LOG2_N}")
    names = [f"cold{i}" for i in range(count)]
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        hashes = list(pool.map(lambda name: passwords.hash_password(f"pw-{name}".encode()),
                               names))
    for stored in hashes:
        if stored.split("$")[1] != str(PRODUCTION_LOG2_N):
            raise RuntimeError(f"a hash was made at log2 n = {stored.split('$')[1]}")
    return dict(zip(names, hashes, strict=True))


def run_store(n: int, workdir: Path) -> list[Row]:
    started = time.monotonic()
    users = store_users(WARMUP + n)
    log(f"  {len(users)} users hashed at scrypt log2 n = {PRODUCTION_LOG2_N} "
        f"in {time.monotonic() - started:.0f} s")
    cold = Scenario("store", "cold", [], lambda i: (f"cold{i}", f"pw-cold{i}"))
    rows = [measure(cold, n, workdir, users)]
    cached = Scenario("store", "cached", [], lambda i: ("cold0", "pw-cold0"),
                      expect_backend="all")  # the store's cache is inside the backend
    rows.append(measure(cached, n, workdir, users))
    for row in rows:
        if row.answered:
            row.answered += " (store: its cache is inside the backend)"
    return rows


# --- ldap ----------------------------------------------------------------------------------

def run_ldap(n: int, workdir: Path) -> list[Row]:
    import ldap_support

    why = ldap_support.missing()
    if why:
        return [Row("ldap", "-", error=f"skipped: {why}")]
    directory = ldap_support.start_directory(workdir / "ldap")
    try:
        user = "alice"
        password = ldap_support.USERS[user][0]
        secret = workdir / "ldap-bind-password"
        secret.write_text(ldap_support.SERVICE_PASSWORD + "\n")
        direct = ["--ldap-url", directory.url, "--ldap-user-dn", ldap_support.USER_DN_TEMPLATE]
        search = ["--ldap-url", directory.url, "--ldap-search-base", ldap_support.PEOPLE,
                  "--ldap-bind-dn", ldap_support.SERVICE_DN,
                  "--ldap-bind-password-file", str(secret)]

        def creds(_i: int) -> tuple[str, str]:
            return user, password

        scenarios = [
            Scenario("ldap", "cold", direct, creds, "direct bind", config=COLD),
            Scenario("ldap", "cached", direct, creds, "direct bind", "one"),
            Scenario("ldap", "cold", search, creds, "search+bind", config=COLD),
            Scenario("ldap", "cached", search, creds, "search+bind", "one"),
        ]
        return [measure(s, n, workdir) for s in scenarios]
    finally:
        directory.stop()


# --- http ----------------------------------------------------------------------------------

def run_http(n: int, workdir: Path) -> list[Row]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO)])}
    with open(workdir / "hook.stderr", "wb") as err:
        hook = procs.start([sys.executable, "-c", HOOK_SERVER, HOOK_USER, HOOK_PASSWORD],
                           stdout=subprocess.PIPE, stderr=err, env=env)
    try:
        url = procs.read_line(hook.stdout, 20)
        if not url.startswith("http://"):
            tail = (workdir / "hook.stderr").read_text(errors="replace")[-300:]
            return [Row("http", "-", error=f"the hook did not start: {url!r} {tail}")]

        def creds(_i: int) -> tuple[str, str]:
            return HOOK_USER, HOOK_PASSWORD

        scenarios = [
            Scenario("http", "cold", ["--auth-hook-url", url], creds, config=COLD),
            Scenario("http", "cached", ["--auth-hook-url", url], creds, expect_backend="one"),
        ]
        return [measure(s, n, workdir) for s in scenarios]
    finally:
        procs.stop(hook)


# --- pam -----------------------------------------------------------------------------------

def pam_missing() -> str | None:
    if os.geteuid() != 0:
        return "not root: the pam rows need a throwaway system user and /etc/pam.d file"
    absent = [p for p in ("useradd", "userdel", "chpasswd") if shutil.which(p) is None]
    if absent:
        return f"missing {', '.join(absent)} (Debian package passwd)"
    if not (REPO / "deploy" / "pam.d" / "trisocks").exists():
        return "deploy/pam.d/trisocks (the shipped PAM stack) is missing"
    return None


def run_pam(n: int, workdir: Path) -> list[Row]:
    why = pam_missing()
    if why:
        return [Row("pam", "-", error=f"skipped: {why}")]
    tag = secrets.token_hex(3)
    name, service = f"trisocks-b{tag}", f"trisocks-bench-{tag}"
    password = f"Pam-{secrets.token_hex(8)}"
    service_file = Path("/etc/pam.d") / service
    try:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
                       check=True, capture_output=True, timeout=30)
        subprocess.run(["chpasswd"], input=f"{name}:{password}\n", text=True, check=True,
                       capture_output=True, timeout=30)
        shipped = (REPO / "deploy" / "pam.d" / "trisocks").read_text()
        service_file.write_text("# written by trisocks' benchmarks/logins.py; removed after it\n"
                                + shipped)

        def creds(_i: int) -> tuple[str, str]:
            return name, password

        base = ["--pam-service", service]
        scenarios = [
            Scenario("pam", "cold", base, creds, "shipped stack", config=COLD),
            Scenario("pam", "cached", base, creds, "shipped stack", "one"),
        ]
        return [measure(s, n, workdir) for s in scenarios]
    finally:
        service_file.unlink(missing_ok=True)
        subprocess.run(["userdel", name], capture_output=True, timeout=30, check=False)


# --- report --------------------------------------------------------------------------------

def p99(samples: list[float]) -> float:
    """Nearest-rank 99th percentile."""
    ordered = sorted(samples)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def table(rows: list[Row]) -> list[list[str]]:
    lines = [["backend", "cache", "median ms", "p99 ms", "n", "backend answered"]]
    for row in rows:
        if row.error:
            lines.append([row.label, row.cache, "-", "-", "0", row.error])
            continue
        lines.append([row.label, row.cache, f"{statistics.median(row.samples_ms):.2f}",
                      f"{p99(row.samples_ms):.2f}", str(len(row.samples_ms)), row.answered])
    return lines


def as_text(lines: list[list[str]]) -> str:
    widths = [max(len(line[i]) for line in lines[:] if i < len(line)) for i in range(5)]
    out = []
    for j, line in enumerate(lines):
        cells = [c.ljust(widths[i]) if i < 2 else c.rjust(widths[i])
                 for i, c in enumerate(line[:5])]
        out.append("  ".join(cells) + "  " + line[5])
        if j == 0:
            out.append("  ".join("-" * w for w in widths) + "  " + "-" * 16)
    return "\n".join(out)


def as_markdown(lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(lines[0]) + " |", "|:---|:---|---:|---:|---:|:---|"]
    out += ["| " + " | ".join(line) + " |" for line in lines[1:]]
    return "\n".join(out)


RUNNERS = {"store": run_store, "ldap": run_ldap, "http": run_http, "pam": run_pam}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="measured logins per scenario")
    parser.add_argument("--quick", action="store_true", help="smoke run: 20 logins each")
    parser.add_argument("--only", metavar="LIST", help=f"comma list of {', '.join(RUNNERS)}")
    parser.add_argument("--markdown", type=Path, metavar="FILE",
                        help="also write the table as Markdown")
    args = parser.parse_args()
    n = 20 if args.quick else args.n
    if not 1 <= n <= 10_000:
        sys.exit("--n: between 1 and 10000")
    chosen = [b.strip() for b in (args.only or ",".join(RUNNERS)).split(",") if b.strip()]
    unknown = [b for b in chosen if b not in RUNNERS]
    if unknown:
        sys.exit(f"unknown backend(s) {unknown}; choose from {', '.join(RUNNERS)}")
    started = time.monotonic()
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="trisocks-logins-") as tmp:
        for backend in chosen:
            log(f"== {backend}")
            try:
                rows += RUNNERS[backend](n, Path(tmp))
            except Exception as exc:  # reported in the table; the next backend still runs
                message = " ".join(str(exc).split())[:300] or repr(exc)
                log(f"  {backend}: FAILED: {message}")
                rows.append(Row(backend, "-", error=message))
    command = shlex.join(["python", "benchmarks/logins.py", *sys.argv[1:]])
    preamble = [report.machine_line(),
                f"Command: `{command}` (took {time.monotonic() - started:.0f} s)",
                f"Each login: connect, SOCKS5 greeting, RFC 1929 user/password, status; "
                f"timed from connect to the status; {WARMUP} unmeasured warm-up logins per "
                "scenario; p99 is nearest-rank. 'backend answered': logins the backend itself "
                "accepted, from /metrics trisocks_logins, over all logins made."]
    lines = table(rows)
    print("\n".join(preamble) + "\n\n" + as_text(lines))
    if args.markdown:
        args.markdown.write_text("# Login latency per password backend\n\n"
                                 + "  \n".join(preamble) + "\n\n" + as_markdown(lines) + "\n")
        log(f"wrote {args.markdown}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("interrupted; all started processes were stopped")
