"""``trisocks serve --workers N`` as operators run it: the supervisor restarts a crashed
worker, stops them all on SIGTERM, and gives up (status 2) when their config cannot work."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fleet_support import free_port, run_trisocks
from trisocks.cli.config_flags import read_config
from trisocks.cli.main import build_parser
from trisocks.config import Config, ConfigError, build_config, load_file


def children(pid: int) -> set[int]:
    """Child pids of *pid*, whichever of its threads started them (trio spawns from one)."""
    return {int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()}


def wait_until(predicate: object, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_crashed_worker_is_restarted_and_sigterm_stops_them_all(tmp_path: Path) -> None:
    with run_trisocks(tmp_path, str(tmp_path / "w.db"), workers=2) as server:
        workers = children(server.proc.pid)
        assert len(workers) == 2
        crashed = min(workers)
        subprocess.run(["kill", "-KILL", str(crashed)], check=True)
        wait_until(lambda: "exited with status -9; restarting it in 1s" in server.log_text(),
                   "the supervisor to notice the crash")
        wait_until(lambda: len(children(server.proc.pid) - {crashed}) == 2
                   and server.log_text().count("listening on") == 3, "a new worker")
        workers = children(server.proc.pid)
    # run_trisocks sent SIGTERM and saw status 0; the workers are gone and reaped.
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)


def test_workers_that_cannot_listen_stop_the_supervisor_with_status_2(tmp_path: Path) -> None:
    with socket.socket() as taken:  # bound without SO_REUSEPORT: no worker can share it
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "trisocks", "serve", "--listen", f"127.0.0.1:{port}",
             "--no-admin", "--db", str(tmp_path / "w.db"), "--workers", "2"],
            capture_output=True, text=True, timeout=30,
        )
    assert result.returncode == 2, result.stderr
    assert "exited with status 2: its configuration cannot work" in result.stderr
    assert "cannot listen" in result.stderr


def test_workers_need_fixed_ports(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trisocks", "serve", "--listen", "127.0.0.1:0",
         "--admin", f"127.0.0.1:{free_port()}", "--db", str(tmp_path / "w.db"),
         "--workers", "2"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert "workers: port 0 would give every worker its own port" in result.stderr


async def test_workers_outlive_the_thread_that_could_have_forked_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """PR_SET_PDEATHSIG fires when the *thread* that forked the child exits. Workers forked
    from one of trio's cached threads got SIGTERM once it retired (10 idle seconds, made
    0.05 s here), so every worker stopped 10 s after it started and was restarted."""
    import trio
    import trio._core._thread_cache

    from trisocks.fleet import workers

    monkeypatch.setattr(trio._core._thread_cache, "IDLE_TIMEOUT", 0.05)
    pool = workers._Pool([sys.executable, "-c", "import time; time.sleep(60)"])
    async with trio.open_nursery() as nursery:
        nursery.start_soon(workers._keep_running, pool, 0)
        await trio.sleep(0.1)
        (proc,) = pool.running.values()
        await trio.to_thread.run_sync(time.sleep, 0)  # a cached thread, retired 0.05 s later
        await trio.sleep(1.0)
        assert proc.poll() is None and pool.running[0] is proc  # alive, never restarted
        pool.stop()
    assert proc.returncode == -15  # the SIGTERM of stop(), reaped
    assert not pool.running


def test_workers_stop_when_the_supervisor_dies(tmp_path: Path) -> None:
    log = tmp_path / "supervisor.log"
    with open(log, "wb") as out:
        supervisor = subprocess.Popen(
            [sys.executable, "-m", "trisocks", "serve", "--listen", f"127.0.0.1:{free_port()}",
             "--no-admin", "--db", str(tmp_path / "w.db"), "--workers", "2"],
            stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: log.read_text().count("listening on") == 2, "two workers")
        workers = children(supervisor.pid)
    finally:
        supervisor.kill()  # no chance to stop them itself: PR_SET_PDEATHSIG must
        supervisor.wait()

    def running(pid: int) -> bool:
        try:
            return "zombie" not in Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return False

    assert len(workers) == 2
    wait_until(lambda: not any(map(running, workers)), "the orphaned workers to stop")


def _socks5_connect_reply(port: int, target: tuple[str, int]) -> int:
    """REP of a no-auth SOCKS5 CONNECT to the IPv4 *target* through 127.0.0.1:*port*."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"\x05\x01\x00")
        assert sock.recv(2) == b"\x05\x00"
        sock.sendall(b"\x05\x01\x00\x01" + socket.inet_aton(target[0])
                     + target[1].to_bytes(2, "big"))
        reply = sock.recv(10)
        assert reply[:1] == b"\x05", reply
        return reply[1]


def test_every_worker_denies_the_admin_endpoint(tmp_path: Path) -> None:
    """Only worker 0 serves the admin API, but ``@admin`` is denied by all of them: the
    kernel spreads these connections over both workers (SO_REUSEPORT hashes the client's
    port), and each one is refused by the shipped admin-endpoint rule."""
    port, admin = free_port(), free_port()
    log = tmp_path / "serve.log"
    argv = [sys.executable, "-m", "trisocks", "serve", "--listen", f"127.0.0.1:{port}",
            "--admin", f"127.0.0.1:{admin}", "--auth", "none", "--db", str(tmp_path / "w.db"),
            "--workers", "2"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: log.read_text().count("listening on") >= 2, "two workers")
        replies = [_socks5_connect_reply(port, ("127.0.0.1", admin)) for _ in range(24)]
        assert replies == [2] * 24
        wait_until(lambda: log.read_text().count("rule=admin-endpoint") >= 24, "24 log lines")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]


def test_workers_auto_is_one_per_core_of_the_affinity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 2, 5})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)  # the affinity wins: taskset, cgroups
    assert build_config({"workers": "auto"}, {}).workers == 3
    (tmp_path / "t.toml").write_text('workers = "auto"\n')
    assert build_config(load_file(tmp_path / "t.toml"), {}).workers == 3
    assert build_config({"workers": 2}, {"workers": "auto"}).workers == 3  # the flag wins
    assert build_config({"workers": "auto"}, {"workers": 2}).workers == 2
    assert build_config({}, {}).workers == Config().workers == 1  # the default stays 1


def test_workers_auto_without_sched_getaffinity_counts_the_cpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 6)
    assert build_config({"workers": "auto"}, {}).workers == 6
    monkeypatch.setattr(os, "cpu_count", lambda: None)  # unknown
    assert build_config({"workers": "auto"}, {}).workers == 1


@pytest.mark.parametrize("value", [0, -1, "many", 1.5, True, "2", "AUTO"])
def test_bad_workers_is_a_config_error_naming_the_key(value: object) -> None:
    with pytest.raises(ConfigError) as error:
        build_config({"workers": value}, {})
    assert str(error.value) == f'workers: expected a whole number >= 1 or "auto", got {value!r}'


def test_workers_flag_takes_a_count_or_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})

    def workers(*flags: str) -> int:
        args = build_parser().parse_args(["serve", "--listen", "127.0.0.1:1080", *flags])
        return read_config(args).workers

    assert workers("--workers", "auto") == 4
    assert workers("--workers", "3") == 3
    assert workers() == 1
    for bad, shown in (("0", "0"), ("-1", "-1"), ("many", "'many'"), ("1.5", "'1.5'")):
        with pytest.raises(ConfigError) as error:
            workers("--workers", bad)
        assert str(error.value) == f'workers: expected a whole number >= 1 or "auto", got {shown}'


def test_workers_auto_on_one_core_keeps_port_0(monkeypatch: pytest.MonkeyPatch) -> None:
    """Port 0 is refused with more than one worker; "auto" that is one worker is one process."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert build_config({"workers": "auto", "listen": "127.0.0.1:0"}, {}).workers == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    with pytest.raises(ConfigError, match="workers: port 0 would give every worker"):
        build_config({"workers": "auto", "listen": "127.0.0.1:0"}, {})


@pytest.mark.parametrize("command", ["serve", "check"])
def test_bad_workers_flag_exits_2_on_one_line(tmp_path: Path, command: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trisocks", command, "--listen", f"127.0.0.1:{free_port()}",
         "--no-admin", "--db", str(tmp_path / "w.db"), "--workers", "many"],
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr == (
        "trisocks: error: workers: expected a whole number >= 1 or \"auto\", got 'many'\n")


def test_workers_auto_serves_one_worker_per_core(tmp_path: Path) -> None:
    """The supervisor and every worker it runs again with ``--workers auto`` resolve it alike
    (the affinity is inherited); at most two cores here, so that the test stays cheap."""
    cpus = sorted(os.sched_getaffinity(0))[:2]
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trisocks", "serve", "--listen", f"127.0.0.1:{free_port()}",
             "--no-admin", "--db", str(tmp_path / "w.db"), "--workers", "auto"],
            stdout=out, stderr=subprocess.STDOUT,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus))
    try:
        wait_until(lambda: log.read_text().count("listening on") == len(cpus),
                   f"{len(cpus)} worker(s)")
        if len(cpus) > 1:  # a supervisor and its workers; on one core, one process
            assert len(children(proc.pid)) == len(cpus)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()[-3000:]
