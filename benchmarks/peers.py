"""The SOCKS5 servers under test and how to start each one.

Each server is a ``Server`` whose ``prepare(port, workdir)`` returns a
``Launch``: the command line, environment, the credentials clients must use
(None = no authentication) and notes for the report's footnotes. ``check``
(optional) inspects the started process and its output files (``stdout`` and
``stderr`` in the workdir) and returns a note, e.g. whether pproxy really runs
on uvloop. ``NO_PROXY`` is the direct-to-origin baseline.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import procs

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
USER, PASSWORD = "bench", "benchpass"
ADMIN_TOKEN = "benchtoken"


@dataclass
class Launch:
    argv: list[str]
    user: str | None = None
    password: str | None = None
    env: dict[str, str] | None = None
    notes: list[str] = field(default_factory=list)
    check: Callable[[int, Path], str] | None = None  # (pid, workdir) -> note, once it accepts


@dataclass
class Server:
    name: str
    prepare: Callable[[int, Path], Launch] | None  # None: no server (direct to origin)
    missing: Callable[[], str | None] = lambda: None  # reason it cannot run, if any
    proxy_type: str = "socks5"  # how the load generators speak to it (http: CONNECT)


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


def microsocks(port: int, workdir: Path) -> Launch:
    argv = [_which("microsocks"), "-i", "127.0.0.1", "-p", str(port), "-u", USER, "-P", PASSWORD]
    return Launch(
        argv, USER, PASSWORD, notes=["username/password auth (-u/-P), one thread per connection"]
    )


DANTE_CONF = """\
logoutput: stderr
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
clientmethod: none
socksmethod: none
user.privileged: {privileged}
user.unprivileged: {unprivileged}
client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}
socks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 command: connect }}
"""


def dante(port: int, workdir: Path) -> Launch:
    is_root = os.geteuid() == 0
    conf = workdir / "danted.conf"
    conf.write_text(
        DANTE_CONF.format(
            port=port,
            privileged="root" if is_root else os.environ.get("USER", "nobody"),
            unprivileged="nobody" if is_root else os.environ.get("USER", "nobody"),
        )
    )
    return Launch(
        [_which("danted"), "-f", str(conf)],
        notes=[
            "no auth: Dante's username method checks system accounts (passwd/PAM), "
            "which a benchmark should not create",
            "forks negotiate/request/io child processes; CPU and memory are summed over them",
        ],
        check=dante_check,
    )


def dante_check(pid: int, workdir: Path) -> str:
    problems = [
        line.split(": ", 1)[-1].strip()
        for line in (workdir / "stderr").read_text(errors="replace").splitlines()
        if " error: " in line or " warning: " in line or " alert: " in line
    ]
    return f"startup problems: {'; '.join(problems)}" if problems else "started with no errors"


def pproxy_uvloop_check(pid: int, workdir: Path) -> str:
    text = (workdir / "stdout").read_text(errors="replace")
    loop = next((line for line in text.splitlines() if line.startswith("event loop:")), "")
    if "Using uvloop" in text and "uvloop.Loop" in loop and procs.maps_contain(pid, "uvloop/loop"):
        return "runs on uvloop (pproxy printed 'Using uvloop', loop is uvloop.Loop)"
    return f"WARNING: uvloop not confirmed; pproxy stdout: {text.strip()[:200]!r}"


def pproxy(port: int, workdir: Path) -> Launch:
    uri = f"socks5://127.0.0.1:{port}#{USER}:{PASSWORD}"
    return Launch(
        [sys.executable, str(HERE / "pproxy_uvloop.py"), "-l", uri],
        USER,
        PASSWORD,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        notes=[
            "username/password auth (-l socks5://...#user:pass); started through "
            "pproxy_uvloop.py because pproxy 2.7.9 crashes at startup with uvloop 0.23",
        ],
        check=pproxy_uvloop_check,
    )


def pproxy_mixed(port: int, workdir: Path) -> Launch:
    """:func:`pproxy` serving HTTP and SOCKS5 on one port (``http+socks5://``), measured
    through HTTP CONNECT: the one-port peer of trisocks' HTTP row."""
    launch = pproxy(port, workdir)
    launch.argv[-1] = f"http+socks5://127.0.0.1:{port}#{USER}:{PASSWORD}"
    launch.notes[0] = ("HTTP and SOCKS5 on one port (-l http+socks5://...#user:pass), "
                       "measured via HTTP CONNECT")
    return launch


def trisocks_command(tree: Path | None = None) -> list[str] | None:
    """How to run trisocks: the installed executable, or *tree*'s sources when given."""
    if tree is not None:
        return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(tree)!r}); "
                "from trisocks.cli.main import main; sys.exit(main())"]
    exe = Path(sys.executable).parent / "trisocks"
    if exe.exists():
        return [str(exe)]
    main = importlib.util.find_spec("trisocks.cli.main")
    if (REPO / "trisocks" / "__main__.py").exists() or main:
        return [sys.executable, "-m", "trisocks"]
    return None


def trisocks_missing() -> str | None:
    return None if trisocks_command() else "no trisocks executable or trisocks/__main__.py yet"


def has_flag(help_text: str, flag: str) -> bool:
    return re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", help_text) is not None


def _run(argv: list[str], stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60, cwd=REPO)


def trisocks(port: int, workdir: Path, tree: Path | None = None) -> Launch:
    """trisocks as users run it: password auth, admin API and accounting on (from *tree*'s
    sources when given: :func:`trisocks_at`).

    Flags that ``trisocks serve --help`` does not list are dropped (with a note),
    so the harness keeps working while the CLI is still growing.
    """
    cmd = trisocks_command(tree)
    helped = _run([*cmd, "serve", "--help"])
    if helped.returncode != 0:
        last = (helped.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"`trisocks serve --help` failed: {last}")
    help_text = helped.stdout
    db = workdir / "trisocks.db"
    notes: list[str] = []
    argv = [*cmd, "serve", "--listen", f"127.0.0.1:{port}"]
    user = password = None
    if has_flag(help_text, "--auth") and has_flag(help_text, "--db"):
        added = _run(
            [*cmd, "user", "add", USER, "--password-stdin", "--db", str(db)], PASSWORD + "\n"
        )
        if added.returncode == 0:
            argv += ["--auth", "password", "--db", str(db)]
            user, password = USER, PASSWORD
            notes.append("username/password auth with a user in a fresh SQLite db")
        else:
            error = added.stderr.strip()[-300:]
            notes.append(f"WARNING: `trisocks user add` failed, running without auth: {error}")
    else:
        notes.append("WARNING: `serve` has no --auth/--db yet, running without auth")
    optional = [
        ("--admin", f"127.0.0.1:{procs.free_port()}"),
        ("--admin-token", ADMIN_TOKEN),
        ("--log-level", "warning"),
    ]
    for flag, value in optional:
        if has_flag(help_text, flag):
            argv += [flag, value]
        else:
            notes.append(f"WARNING: `serve` has no {flag} yet, left out")
    if has_flag(help_text, "--admin"):
        notes.append(
            "admin API on (own port, bearer token), accounting to the db, log level warning"
        )
    return Launch(argv, user, password, notes=notes)


def trisocks_at(tree: Path, name: str) -> Server:
    """:func:`trisocks` run from the sources in *tree* (a worktree of an earlier revision)."""
    return Server(name, lambda port, workdir: trisocks(port, workdir, tree))


def trisocks_tls_missing() -> str | None:
    if importlib.util.find_spec("trustme") is None:
        return "trustme not installed (pip install trustme: the benchmark's certificate)"
    return trisocks_missing()


def trisocks_tls(port: int, workdir: Path) -> Launch:
    """:func:`trisocks` on a ``tls://`` listener, with a certificate from a throwaway CA."""
    import trustme

    launch = trisocks(port, workdir)
    cert = trustme.CA().issue_cert("127.0.0.1")
    cert_file, key_file = workdir / "tls-cert.pem", workdir / "tls-key.pem"
    cert_file.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    cert.private_key_pem.write_to_path(str(key_file))
    at = launch.argv.index("--listen") + 1
    launch.argv[at] = f"tls://{launch.argv[at]}"
    launch.argv += ["--tls-cert", str(cert_file), "--tls-key", str(key_file)]
    launch.notes.append("SOCKS5 inside TLS (OpenSSL defaults, TLS 1.3 on loopback; the "
                        "load generators do not check the certificate); copy engine")
    return launch


VIA_RULE = """\
[[rules]]
id = "via-parent"
action = "allow"
via = ["socks5h://{auth}127.0.0.1:{port}"]
"""


def trisocks_via(port: int, workdir: Path) -> Launch:
    """:func:`trisocks` with every CONNECT going through a second trisocks (the parent: the
    same flags, its own port, db and admin port): the cost of one more hop. Both run in one
    process group (a shell starts the parent, waits for it to accept, then becomes the child),
    so the CPU column is the two together."""
    parent_port = procs.free_port()
    parent_dir = workdir / "parent"
    parent_dir.mkdir(exist_ok=True)
    parent = trisocks(parent_port, parent_dir)
    launch = trisocks(port, workdir)
    auth = f"{USER}:{PASSWORD}@" if parent.user else ""
    conf = workdir / "via.toml"
    conf.write_text(VIA_RULE.format(auth=auth, port=parent_port))
    launch.argv += ["--config", str(conf)]
    wait = (f"for i in $(seq 200); do (exec 3<>/dev/tcp/127.0.0.1/{parent_port}) 2>/dev/null"
            " && break; sleep 0.05; done")
    script = f"{shlex.join(parent.argv)} & {wait}; exec {shlex.join(launch.argv)}"
    launch.argv = ["bash", "-c", script]
    launch.notes.append("every CONNECT through a trisocks parent on loopback (socks5h, "
                        "password auth to it); CPU and memory are both processes'")
    return launch


def pproxy_missing() -> str | None:
    if importlib.util.find_spec("pproxy") and importlib.util.find_spec("uvloop"):
        return None
    return "pproxy or uvloop not installed"


NO_PROXY = Server("no proxy", None)
SERVERS = [
    NO_PROXY,
    Server(
        "microsocks",
        microsocks,
        lambda: None if _which("microsocks") else "microsocks not installed",
    ),
    Server("dante", dante, lambda: None if _which("danted") else "danted not installed"),
    Server(
        "pproxy+uvloop",
        pproxy,
        pproxy_missing,
    ),
    Server("trisocks", trisocks, trisocks_missing),
    Server("trisocks-via (through a trisocks parent)", trisocks_via, trisocks_missing),
    Server(
        "pproxy+uvloop (HTTP CONNECT)",
        pproxy_mixed,
        pproxy_missing,
        proxy_type="http",
    ),
    Server("trisocks (HTTP CONNECT)", trisocks, trisocks_missing, proxy_type="http"),
    Server("trisocks (SOCKS5 over TLS)", trisocks_tls, trisocks_tls_missing,
           proxy_type="socks5-tls"),
]
