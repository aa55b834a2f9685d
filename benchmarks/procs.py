"""Process plumbing for the benchmarks: process groups, readiness, /proc accounting.

Every child (servers, origin, load generators) is started in its own session,
so it is the leader of a process group that also holds any processes it forks
(Dante's children, for instance). Stopping sends SIGTERM to the group, then
SIGKILL after a timeout, then a final SIGKILL sweep for stragglers.

CPU and memory are read from /proc for the whole group:

* CPU: utime + stime + cutime + cstime (clock ticks) from /proc/PID/stat of
  every process in the group, i.e. including children, live or reaped.
* Memory: the sum of Pss from /proc/PID/smaps_rollup over the group. For a
  single-process server this is its RSS less its share of pages it shares with
  other processes (shared libraries); for forking servers it counts shared
  pages once instead of once per process.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")


def start(argv: list[str], **kwargs) -> subprocess.Popen:
    """Start argv as the leader of a new session/process group."""
    return subprocess.Popen(argv, start_new_session=True, **kwargs)


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM the group leader (it may shut its children down itself); after
    timeout, SIGKILL the whole process group; finally SIGKILL any stragglers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout)


def wait_accepting(port: int, proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """Return once 127.0.0.1:port accepts connections; raise if proc exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before accepting")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1.0).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"not accepting on port {port} after {timeout:.0f} s")


def read_line(stream, timeout: float) -> str:
    """Read one line from a child's pipe, giving up after timeout seconds."""
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        raise TimeoutError(f"no output within {timeout:.0f} s")
    return stream.readline().decode(errors="replace").strip()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def group_pids(pgid: int) -> list[int]:
    """PIDs of all live processes in process group pgid."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid:  # fields[0] is state; pgrp is field 5 of stat
            pids.append(int(entry.name))
    return pids


def cpu_seconds(pgid: int) -> float:
    """User + system CPU of the group, including (reaped) children."""
    ticks = 0
    for pid in group_pids(pgid):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        ticks += sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
    return ticks / CLK_TCK


def wait_quiet(pgid: int, timeout: float = 15.0, window: float = 0.3) -> float:
    """Wait until the group uses (almost) no CPU for *window* seconds: a server that accepts
    already may still be starting (trisocks starts its admin API after its listeners), and
    that start-up must not be charged to the first measurement. Returns the seconds waited."""
    started = time.monotonic()
    last = cpu_seconds(pgid)
    while time.monotonic() - started < timeout:
        time.sleep(window)
        now = cpu_seconds(pgid)
        if now - last <= 0.02 * window + 1 / CLK_TCK:
            break
        last = now
    return time.monotonic() - started


def pss_kib(pgid: int) -> int:
    """Sum of Pss (KiB) over the group's processes."""
    total = 0
    for pid in group_pids(pgid):
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    return total


def process_count(pgid: int) -> int:
    return len(group_pids(pgid))


def maps_contain(pid: int, needle: str) -> bool:
    """Whether a shared object whose path contains needle is mapped into pid."""
    try:
        return needle in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False
