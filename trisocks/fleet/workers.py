"""``trisocks serve --workers N``: N serving processes on the same ports, and their supervisor.

One trio run uses one core. The supervisor (the process the operator started) runs no
sessions: it starts N copies of its own command line, marked with ``$TRISOCKS_WORKER``, each a
complete server that binds the listeners with ``SO_REUSEPORT``
(:func:`trisocks.server.listeners.open_listeners`), and joins the fleet through the shared
SQLite file (or PostgreSQL). Worker 0 also serves the admin API, which sees and kills every
worker's sessions (:mod:`trisocks.fleet.node`).

Supervision:

- a worker that exits while the supervisor is not stopping is logged and restarted, after a
  delay that doubles while it keeps failing fast (1 s up to 30 s);
- a worker that exits with status 2 (its configuration cannot work: a port in use, a bad
  database) is not restarted: the supervisor stops the others and exits 2;
- SIGTERM/SIGINT are forwarded as SIGTERM (each worker drains for ``shutdown_grace``), SIGHUP
  is forwarded as is (each worker reloads); the supervisor exits once every worker has;
- a worker whose supervisor dies gets SIGTERM from the kernel (``PR_SET_PDEATHSIG``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys

import attrs
import trio

from trisocks.config import Config

__all__ = ["WORKER_ENV", "supervise", "worker_index"]

log = logging.getLogger("trisocks.workers")

WORKER_ENV = "TRISOCKS_WORKER"
"""Set in a worker's environment to its index (0 .. N-1)."""
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 30.0
STABLE_AFTER = 10.0
"""A worker that ran this long was healthy: its next restart waits :data:`RESTART_DELAY`."""
_PR_SET_PDEATHSIG = 1


def worker_index() -> int | None:
    """This process's worker index, or ``None`` when it is not a worker."""
    value = os.environ.get(WORKER_ENV)
    return int(value) if value is not None else None


def supervise(config: Config, argv: list[str]) -> int:
    """Run ``config.workers`` copies of ``trisocks <argv>`` until SIGINT/SIGTERM; return the
    exit status (0, or 2 when a worker's configuration cannot work)."""
    return trio.run(_supervise, config.workers, argv)


@attrs.define
class _Pool:
    command: list[str]
    stopping: trio.Event = attrs.field(factory=trio.Event)
    running: dict[int, subprocess.Popen[bytes]] = attrs.field(factory=dict)
    status: int = 0

    def signal_all(self, signum: int) -> None:
        for proc in self.running.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    def stop(self, status: int = 0) -> None:
        self.status = self.status or status
        self.stopping.set()
        self.signal_all(signal.SIGTERM)


async def _supervise(count: int, argv: list[str]) -> int:
    pool = _Pool([sys.executable, "-m", "trisocks", *argv])
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:

        async def forward() -> None:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    pool.signal_all(signal.SIGHUP)
                else:
                    log.info("stopping %d workers", count)
                    pool.stop()

        async with trio.open_nursery() as outer:
            outer.start_soon(forward)
            async with trio.open_nursery() as workers:  # each task returns once stopping
                for index in range(count):
                    workers.start_soon(_keep_running, pool, index)
            outer.cancel_scope.cancel()
    return pool.status


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies, so no worker is orphaned.

    The kernel sends it when the *thread* that forked the child exits (prctl(2)), which is why
    :func:`_spawn` forks from the main thread.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _spawn(command: list[str], index: int) -> subprocess.Popen[bytes]:
    """Start worker *index* from the main thread.

    Not ``trio.lowlevel.open_process``: it forks in a worker thread of trio's cache, which
    exits after 10 idle seconds and so fired every worker's PDEATHSIG, stopping each one 10 s
    after it started. Forking here blocks the supervisor's loop for a few milliseconds; it
    runs no sessions.
    """
    return subprocess.Popen(command, env={**os.environ, WORKER_ENV: str(index)},
                            preexec_fn=_die_with_parent)


async def _wait(proc: subprocess.Popen[bytes]) -> int:
    """Wait for *proc* to exit without a thread (a pidfd is readable once it has); reap it."""
    pidfd = os.pidfd_open(proc.pid)
    try:
        await trio.lowlevel.wait_readable(pidfd)
    finally:
        os.close(pidfd)
    return proc.wait()


async def _keep_running(pool: _Pool, index: int) -> None:
    delay = RESTART_DELAY
    while not pool.stopping.is_set():
        proc = _spawn(pool.command, index)
        pool.running[index] = proc
        if pool.stopping.is_set():  # a signal came while it was starting
            proc.terminate()
        started = trio.current_time()
        try:
            status = await _wait(proc)
        finally:
            if proc.poll() is None:  # the supervisor itself is being torn down
                proc.kill()
                with trio.CancelScope(shield=True):
                    await _wait(proc)
            del pool.running[index]
        if pool.stopping.is_set():
            return
        if status == 2:
            log.error("worker %d (pid %d) exited with status 2: its configuration cannot "
                      "work; stopping", index, proc.pid)
            pool.stop(2)
            return
        delay = RESTART_DELAY if trio.current_time() - started > STABLE_AFTER else delay
        log.error("worker %d (pid %d) exited with status %d; restarting it in %.0fs",
                  index, proc.pid, status, delay)
        with trio.move_on_after(delay):
            await pool.stopping.wait()
        delay = min(delay * 2, RESTART_DELAY_MAX)
