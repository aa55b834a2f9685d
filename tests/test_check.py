"""Issue 12, the command line: ``trisocks check`` (the config, the rules and the db, read-only,
nothing bound), ``trisocks --version``, and the admin token kept off the command line
(``admin_token_file``, ``$TRISOCKS_ADMIN_TOKEN``; ``--admin-token`` warns)."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import trisocks
from tests.test_cli import TRISOCKS, free_port, run, wait_listening
from trisocks.config import KEYS, Config, ConfigError, config_warnings, read_token_file

DEPLOY = Path(__file__).parent.parent / "deploy"


def errors(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The error lines, checked to be the whole of stderr but for warnings."""
    lines = [line for line in result.stderr.splitlines()
             if not line.startswith("trisocks: warning: ")]
    assert all(line.startswith("trisocks: error: ") for line in lines), result.stderr
    return [line.removeprefix("trisocks: error: ") for line in lines]


def warnings_of(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line.removeprefix("trisocks: warning: ") for line in result.stderr.splitlines()
            if line.startswith("trisocks: warning: ")]


def make_db(path: Path, version: int | None = None) -> None:
    assert run("user", "add", "alice", "--password-stdin", stdin="pw\n", db=path).returncode == 0
    if version is not None:
        with sqlite3.connect(path) as db:
            db.execute(f"PRAGMA user_version = {version}")
        db.close()


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"trisocks {trisocks.__version__}\n"


def test_check_takes_every_flag_serve_takes() -> None:
    result = run("check", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for key in KEYS:
        assert "--" + key.replace("_", "-") in text


# --- check: all is well ---------------------------------------------------------------------


@pytest.mark.parametrize("case", ["no-db-yet", "existing-db", "example-config", "rules-file"])
def test_check_ok_is_one_line_and_exit_0(tmp_path: Path, case: str) -> None:
    db = tmp_path / "t.db"
    args = []
    if case != "no-db-yet":
        make_db(db)
    if case == "example-config":
        args = ["--config", str(DEPLOY / "trisocks.example.toml")]
    if case == "rules-file":
        rules = tmp_path / "rules.toml"
        rules.write_text('[[rules]]\nid = "no-smtp"\naction = "deny"\nports = [25]\n')
        args = ["--rules", str(rules)]
    result = run("check", *args, db=db)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("configuration OK: ") and result.stdout.count("\n") == 1
    assert result.stderr == ""
    assert db.exists() == (case != "no-db-yet")  # check never creates the db


def test_check_binds_nothing_and_migrates_nothing(tmp_path: Path) -> None:
    """The listen port is taken (serve would fail on it); the db has an old schema (serve would
    migrate it): check opens nothing but the db, read-only."""
    db = tmp_path / "t.db"
    make_db(db, version=1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("check", "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{port}",
                     db=db)
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (1,)
    conn.close()


# --- check: problems, one line each ---------------------------------------------------------


def _garbage(db: Path) -> None:
    db.write_bytes(b"this is not a database" * 100)
    db.chmod(0o600)


@pytest.mark.parametrize(("toml", "flags", "prepare", "expected"), [
    ('idle_timeout = "soon"\nauth = ["kerberos"]\n', (), None,
     ["idle_timeout: expected a number", "auth: unknown method 'kerberos'"]),
    ('bogus = 1\n', (), None, ["bogus: unknown config key"]),
    ('rules = [{ action = "maybe" }]\n', (), None, ["rules: "]),
    ('rules = [{ action = "allow", users = ["@ops"] }]\n', (), None,
     ["rules: group @ops is not defined in groups"]),
    ("", ("--rules", "{tmp}/missing-rules.toml"), None, ["rules: cannot read"]),
    ("", ("--admin-token-file", "{tmp}/missing-token"), None,
     ["admin_token_file: file {tmp}/missing-token does not exist"]),
    ("", ("--admin-token-file", "{tmp}/empty-token"), "empty-token",
     ["admin_token_file: file {tmp}/empty-token is empty"]),
    ('admin_token = "abc"\n', ("--admin-token-file", "{tmp}/token"), "token",
     ["admin_token_file: give admin_token or admin_token_file, not both"]),
    ("", ("--db", "{tmp}/nowhere/t.db"), None,
     ["db: database directory {tmp}/nowhere does not exist"]),
    ("", ("--db", "{tmp}/garbage.db"), "garbage", ["db: cannot open database {tmp}/garbage.db"]),
    ("", ("--db", "{tmp}/future.db"), "future", ["schema version 99"]),
    ("", ("--db", "postgresql://u:secret@127.0.0.1:{closed}/trisocks"), None,
     ["db: cannot open postgresql://u@127.0.0.1/trisocks: "]),
    ('idle_timeout = -1\n', ("--db", "{tmp}/nowhere/t.db", "--connect-timeout", "0"), None,
     ["idle_timeout: must be greater than 0", "connect_timeout: must be greater than 0"]),
], ids=["two-keys", "unknown-key", "bad-rule", "undefined-group", "rules-file-missing",
        "token-file-missing", "token-file-empty", "token-twice", "db-dir-missing",
        "db-not-sqlite", "db-newer-schema", "postgres-unreachable", "keys-before-db"])
def test_check_names_every_problem_one_line_each_exit_2(
    tmp_path: Path, toml: str, flags: tuple[str, ...], prepare: str | None,
    expected: list[str],
) -> None:
    subst = {"tmp": str(tmp_path), "closed": str(free_port())}
    if prepare == "empty-token":
        (tmp_path / "empty-token").write_text("\n")
    elif prepare == "token":
        (tmp_path / "token").write_text("abc\n")
    elif prepare == "garbage":
        _garbage(tmp_path / "garbage.db")
    elif prepare == "future":
        make_db(tmp_path / "future.db", version=99)
    config = tmp_path / "t.toml"
    config.write_text(toml)
    args = [a.format(**subst) for a in flags]
    if "--db" not in args:
        args += ["--db", str(tmp_path / "t.db")]
    result = run("check", "--config", str(config), *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == "" and "Traceback" not in result.stderr
    lines = errors(result)
    assert len(lines) == len(expected), lines
    for line, want in zip(lines, expected, strict=True):
        assert want.format(**subst) in line
    assert "secret" not in result.stderr


def test_check_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = run("check", "--config", str(tmp_path / "none.toml"))
    assert result.returncode == 2
    assert errors(result) == [f"config: file {tmp_path / 'none.toml'} does not exist"]


# --- the admin token off the command line ---------------------------------------------------


@pytest.mark.parametrize(("mode", "readers"), [
    (0o600, None), (0o400, None), (0o640, "group"), (0o604, "others"),
    (0o644, "group and others"),
])
def test_token_file_mode_warning(tmp_path: Path, mode: int, readers: str | None) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(mode)
    warnings = config_warnings(Config(admin_token_file=token))
    if readers is None:
        assert warnings == []
    else:
        assert warnings == [f"admin_token_file: {token} is readable by {readers} "
                            f"(mode {mode:04o}); chmod 600 it"]


@pytest.mark.parametrize(("content", "result"), [
    ("tok\n", "tok"), ("  tok  \r\n\n", "tok"), ("", ConfigError), (" \n\t\n", ConfigError),
    ("one\ntwo\n", ConfigError),
])
def test_read_token_file(tmp_path: Path, content: str, result: str | type[Exception]) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    if isinstance(result, str):
        assert read_token_file(path) == result
    else:
        with pytest.raises(result, match=r"^admin_token_file: "):
            read_token_file(path)


def test_check_warns_about_a_token_on_the_command_line_and_a_readable_file(
    tmp_path: Path,
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    token.chmod(0o644)
    result = run("check", "--admin-token-file", str(token), db=tmp_path / "t.db")
    assert result.returncode == 0, result.stderr
    assert warnings_of(result) == [
        f"admin_token_file: {token} is readable by group and others (mode 0644); chmod 600 it"]
    result = run("check", "--admin-token", "s3cret", db=tmp_path / "t.db")
    assert result.returncode == 0, result.stderr
    (warning,) = warnings_of(result)
    assert warning.startswith("--admin-token: ") and "process list" in warning
    assert "s3cret" not in result.stderr


def test_check_passes_on_what_opening_the_db_warns_about(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    make_db(db)
    db.chmod(0o644)
    result = run("check", db=db)
    assert result.returncode == 0, result.stderr
    (warning,) = warnings_of(result)
    assert str(db) in warning


def get_status(port: int, token: str) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/stats",
                                     headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize("source", ["file", "env", "flag"])
def test_serve_takes_the_admin_token_from_file_env_or_flag(tmp_path: Path, source: str) -> None:
    db = tmp_path / "t.db"
    make_db(db)
    token = tmp_path / "token"
    token.write_text("from-the-file\n")
    token.chmod(0o600)
    expected = {"file": "from-the-file", "env": "from-the-env", "flag": "from-the-flag"}[source]
    extra = {"file": ["--admin-token-file", str(token)], "env": [],
             "flag": ["--admin-token", "from-the-flag"]}[source]
    env = {k: v for k, v in os.environ.items() if k != "TRISOCKS_ADMIN_TOKEN"}
    if source == "env":
        env["TRISOCKS_ADMIN_TOKEN"] = "from-the-env"
    admin = free_port()
    proc = subprocess.Popen(
        [*TRISOCKS, "serve", "--listen", f"127.0.0.1:{free_port()}", "--admin",
         f"127.0.0.1:{admin}", "--db", str(db), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**env, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_listening(admin, proc)
        assert get_status(admin, expected) == 200
        assert get_status(admin, "wrong") == 401
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    warned = [line for line in err.splitlines() if line.startswith("trisocks: warning: ")]
    if source == "flag":
        assert len(warned) == 1 and warned[0].startswith("trisocks: warning: --admin-token: ")
    else:
        assert warned == []
    assert expected not in err  # the token itself is never logged


@pytest.mark.parametrize(("prepare", "message"), [
    (None, "admin_token_file: file {token} does not exist"),
    ("", "admin_token_file: file {token} is empty"),
], ids=["missing", "empty"])
def test_serve_refuses_an_unusable_token_file(
    tmp_path: Path, prepare: str | None, message: str
) -> None:
    token = tmp_path / "token"
    if prepare is not None:
        token.write_text(prepare)
    result = run("serve", "--listen", f"127.0.0.1:{free_port()}", "--admin-token-file",
                 str(token), db=tmp_path / "t.db")
    assert result.returncode == 2
    assert result.stderr == f"trisocks: error: {message.format(token=token)}\n"
