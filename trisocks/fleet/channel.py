"""Kill requests between instances: PostgreSQL LISTEN/NOTIFY, or a local datagram socket.

A kill is a JSON message ``{"instance", "session", "reason"}`` addressed to the instance that
serves the session (found in the directory). Delivery is at most once and takes milliseconds;
a kill for a session that has just ended finds nothing and is dropped, which is what the
admin asked for anyway.

- :class:`PostgresChannel`: NOTIFY on :data:`KILL_CHANNEL`, which every instance LISTENs to
  (each ignores kills addressed to others). The same connection hears
  :data:`~trisocks.store.postgres.STORE_CHANNEL` and asks the cached store to reload. Waiting is
  trio-native: the loop waits for the listening connection's socket to become readable, then
  lets libpq parse what arrived; no thread sits blocked in a LISTEN.
- :class:`LocalChannel`: workers sharing an SQLite file are on one machine; each binds a Unix
  datagram socket in the abstract namespace (Linux; nothing to clean up after a crash).
  Abstract sockets have no file permissions, so any local user could send to one: the kernel
  attaches each sender's credentials (``SO_PASSCRED``) and kills from another uid are dropped.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from trisocks.fleet.directory import Instance

__all__ = ["KILL_CHANNEL", "Channel", "Kill", "LocalChannel", "PostgresChannel"]

log = logging.getLogger("trisocks.fleet")

KILL_CHANNEL = "trisocks_kill"
RECONNECT_DELAY = 1.0


@attrs.frozen
class Kill:
    instance: str
    session: str
    reason: str

    def encode(self) -> str:
        return json.dumps(attrs.asdict(self))

    @classmethod
    def decode(cls, text: str | bytes) -> Kill | None:
        """``None`` for anything that is not a kill message (logged)."""
        try:
            fields = json.loads(text)
            return cls(str(fields["instance"]), str(fields["session"]), str(fields["reason"]))
        except (ValueError, TypeError, KeyError):
            log.warning("fleet channel: ignored a malformed message %r", text[:200])
            return None


OnKill = Callable[[Kill], None]


class Channel(Protocol):
    address: str
    """What the directory records as this instance's ``channel``."""

    async def send(self, to: Instance, kill: Kill) -> None: ...

    async def run(self, on_kill: OnKill, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver kills addressed to this instance until cancelled; ``started`` once
        listening (no kill sent after that is missed)."""
        ...


class LocalChannel:
    def __init__(self, instance_id: str) -> None:
        self.address = f"trisocks/{instance_id}"

    async def send(self, to: Instance, kill: Kill) -> None:
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                await sock.sendto(kill.encode().encode(), "\0" + to.channel)
            except OSError as exc:  # the owner exited since the directory was read
                log.info("fleet channel: kill for %s not delivered: %s", to.id, exc)

    async def run(self, on_kill: OnKill, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            await sock.bind("\0" + self.address)
            task_status.started()
            while True:
                data, ancdata, _, _ = await sock.recvmsg(65536, socket.CMSG_SPACE(_UCRED.size))
                uid = _sender_uid(ancdata)
                if uid != os.getuid():
                    log.warning("fleet channel: ignored a message from uid %s", uid)
                elif kill := Kill.decode(data):
                    on_kill(kill)


_UCRED = struct.Struct("iII")
"""``struct ucred``: pid, uid, gid."""


def _sender_uid(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancdata:
        if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
            return int(_UCRED.unpack(data[:_UCRED.size])[1])
    return None


class PostgresChannel:
    address = "postgresql"

    def __init__(self, url: str, send_notify: Callable[[str, str], None],
                 on_store_change: Callable[[], None]) -> None:
        """*send_notify(channel, payload)* sends a NOTIFY (blocking; run in a thread) and
        *on_store_change* is called on the loop when another instance changed the store."""
        self._url = url
        self._send_notify = send_notify
        self._on_store_change = on_store_change

    async def send(self, to: Instance, kill: Kill) -> None:
        await trio.to_thread.run_sync(self._send_notify, KILL_CHANNEL, kill.encode())

    async def run(self, on_kill: OnKill, *,
                  task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        import psycopg

        from trisocks.store.postgres import STORE_CHANNEL

        while True:
            try:
                conn = await trio.to_thread.run_sync(
                    lambda: psycopg.Connection.connect(self._url, autocommit=True))
            except psycopg.Error as exc:
                log.warning("fleet channel: cannot connect (%s); retrying", exc)
                await trio.sleep(RECONNECT_DELAY)
                continue
            try:
                await trio.to_thread.run_sync(
                    conn.execute, f"LISTEN {KILL_CHANNEL}; LISTEN {STORE_CHANNEL}")
                task_status.started()
                task_status = trio.TASK_STATUS_IGNORED
                self._on_store_change()  # changes while we were not listening
                pgconn = conn.pgconn
                while True:
                    await trio.lowlevel.wait_readable(pgconn.socket)
                    pgconn.consume_input()  # reads what the kernel has; never waits
                    while (note := pgconn.notifies()) is not None:
                        if note.relname.decode() == STORE_CHANNEL:
                            self._on_store_change()
                        elif kill := Kill.decode(note.extra):
                            on_kill(kill)
            except psycopg.Error as exc:
                log.warning("fleet channel: connection lost (%s); reconnecting", exc)
            finally:
                conn.close()
            await trio.sleep(RECONNECT_DELAY)
