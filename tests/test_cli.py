"""The ``trisocks`` command: users, config validation (exit 2, one clear line), ``serve`` as
a real process (listens, logs, stops cleanly on SIGTERM/SIGINT)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from trisocks.config import KEYS

TRISOCKS = [sys.executable, "-m", "trisocks"]


def run(*args: str, stdin: str = "", db: Path | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--db", str(db)] if db is not None else []
    return subprocess.run(
        [*TRISOCKS, *args, *extra], input=stdin, capture_output=True, text=True, timeout=30
    )


def test_user_lifecycle(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    assert run("user", "add", "alice", "--password-stdin", stdin="pw1\n", db=db).returncode == 0
    assert run("user", "add", "bob", "--password-stdin", stdin="pw2\n", db=db).returncode == 0
    listing = run("user", "list", db=db)
    assert listing.returncode == 0 and listing.stdout.split() == ["alice", "bob"]
    assert run("user", "passwd", "bob", "--password-stdin", stdin="pw3\n", db=db).returncode == 0
    assert run("user", "remove", "alice", db=db).returncode == 0
    assert run("user", "list", db=db).stdout.split() == ["bob"]
    # passwords are stored hashed, never in the clear
    raw = db.read_bytes() + (tmp_path / "u.db-wal").read_bytes() if (
        tmp_path / "u.db-wal").exists() else db.read_bytes()
    assert b"pw3" not in raw and b"scrypt$" in raw


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        (("user", "add", "", "--password-stdin"), "pw\n", "must not be empty"),
        (("user", "add", "x" * 256, "--password-stdin"), "pw\n", "at most 255"),
        (("user", "add", "carol", "--password-stdin"), "\n", "1..255 bytes"),
        (("user", "remove", "nobody"), "", "no user 'nobody'"),
        (("user", "passwd", "nobody", "--password-stdin"), "pw\n", "no user 'nobody'"),
    ],
    ids=["empty-name", "long-name", "empty-password", "remove-unknown", "passwd-unknown"],
)
def test_user_bad_input_exits_2(
    tmp_path: Path, args: tuple[str, ...], stdin: str, message: str
) -> None:
    result = run(*args, stdin=stdin, db=tmp_path / "u.db")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_password_prompt_without_input_exits_2(tmp_path: Path) -> None:
    # A new session has no controlling terminal: getpass falls back to stdin, which is empty.
    result = subprocess.run([*TRISOCKS, "user", "add", "carol", "--db", str(tmp_path / "u.db")],
                            stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            timeout=30, start_new_session=True)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.endswith(
        "trisocks: error: no password read: input ended (to pipe one in, use --password-stdin)\n")


def test_duplicate_user_exits_2(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    run("user", "add", "alice", "--password-stdin", stdin="pw\n", db=db)
    result = run("user", "add", "alice", "--password-stdin", stdin="pw\n", db=db)
    assert result.returncode == 2 and "already exists" in result.stderr


def test_missing_db_directory_exits_2(tmp_path: Path) -> None:
    result = run("user", "list", db=tmp_path / "nope" / "u.db")
    assert result.returncode == 2 and "does not exist" in result.stderr


def test_serve_help_documents_every_key() -> None:
    result = run("serve", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for key in KEYS:
        assert "--" + key.replace("_", "-") in text


@pytest.mark.parametrize(
    ("toml", "flags", "message"),
    [
        ('idle_timeout = "soon"\n', (), "idle_timeout: expected a number"),
        ("bogus_key = 1\n", (), "bogus_key: unknown config key"),
        ('listen = ["127.0.0.1:99999"]\n', (), "listen: port 99999 is out of range"),
        ('auth = ["kerberos"]\n', (), "auth: unknown method 'kerberos'"),
        ("udp_reassembly_timeout = 2\n", (), "at least 5 seconds"),
        ("idle_timeout = [\n", (), "not valid TOML"),
        ("", ("--connect-timeout", "abc"), "--connect-timeout: 'abc' is not a number"),
        ("idle_timeout = nan\n", (), "idle_timeout: must be a finite number, got nan"),
        ("", ("--shutdown-grace", "nan"), "shutdown_grace: must be a finite number, got nan"),
        ("", ("--accounting-flush-interval", "inf"), "must be a finite number, got inf"),
        ("", ("--connection-rate", "nan"), "connection_rate: must be a finite number"),
        ("", ("--listen", "::1:1080"), "brackets"),
        ("", ("--auth", "none", "--listen", "0.0.0.0:1080"), "open proxy"),
    ],
)
def test_bad_config_is_one_clear_line_and_exit_2(
    tmp_path: Path, toml: str, flags: tuple[str, ...], message: str
) -> None:
    config = tmp_path / "t.toml"
    config.write_text(toml)
    result = run("serve", "--config", str(config), *flags, db=tmp_path / "t.db")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("make_token", "message"), [
    (lambda p: p.write_text(""), "cannot start: admin token file {path} is empty"),
    (lambda p: p.mkdir(), "cannot start: {path}: Is a directory"),
], ids=["empty", "directory"])
def test_unusable_admin_token_file_is_named_not_a_listen_error(
    tmp_path: Path, make_token: Any, message: str
) -> None:
    db = tmp_path / "t.db"
    run("user", "add", "alice", "--password-stdin", stdin="pw\n", db=db)
    token = tmp_path / "admin-token"
    make_token(token)
    result = run("serve", "--listen", f"127.0.0.1:{free_port()}",
                 "--admin", f"127.0.0.1:{free_port()}", db=db)
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == "trisocks: error: " + message.format(path=token) + (
        "; delete it for a new token" if "empty" in message else "")
    assert "Traceback" not in result.stderr


def recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n and (chunk := s.recv(n - len(data))):
        data += chunk
    return data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[1]
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    pytest.fail("trisocks serve did not start listening")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_process_with_config_file_json_logs_and_clean_stop(
    tmp_path: Path, sig: signal.Signals
) -> None:
    db = tmp_path / "t.db"
    run("user", "add", "alice", "--password-stdin", stdin="topsecret\n", db=db)
    port = free_port()
    config = tmp_path / "t.toml"
    config.write_text(
        f'listen = ["127.0.0.1:{port}"]\nauth = ["password"]\ndb = "{db}"\n'
        'admin = "off"\nlog_format = "json"\n'
    )
    proc = subprocess.Popen(
        [*TRISOCKS, "serve", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_listening(port, proc)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"\x05\x01\x02\x01\x05alice\x09topsecret")
            assert recv_exactly(s, 4) == b"\x05\x02\x01\x00"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"\x05\x01\x02\x01\x05alice\x05wrong")
            assert recv_exactly(s, 4) == b"\x05\x02\x01\x01"
        time.sleep(0.2)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    sessions = [r for r in records if r.get("event") == "session"]
    assert [s["user"] for s in sessions if "auth" in (s["reason"] or "") or s["user"]] == [
        "alice", None]
    assert all({"client", "command", "target", "bytes_up", "bytes_down", "duration"} <= s.keys()
               for s in sessions)
    assert "topsecret" not in err and "wrong" not in err.replace("wrong password", "")


def test_example_config_names_every_key_and_is_valid() -> None:
    import tomllib

    from trisocks.config import build_config

    path = Path(__file__).parent.parent / "deploy" / "trisocks.example.toml"
    text = path.read_text()
    for key in KEYS:
        assert f"{key} =" in text, f"{key} is not in the example config"
    config = build_config(tomllib.loads(text), {})
    assert config.auth == ("password",) and all(e.is_loopback for e in config.listen)


def test_readme_documents_every_key() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for key in KEYS:
        assert f"| `{key}` |" in readme, f"{key} is missing from the README's config table"
