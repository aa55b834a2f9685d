"""This instance's part in a fleet: publish its sessions, take kills, reach the others'.

Fleet mode is on with a PostgreSQL ``db`` (instances on any machines) or with ``workers > 1``
(processes on one machine sharing the SQLite file). Every instance then

- republishes its live sessions and heartbeat to the directory (:mod:`trisocks.fleet.directory`)
  soon after any session starts or changes, and at least every :data:`HEARTBEAT` seconds;
- listens on its kill channel (:mod:`trisocks.fleet.channel`) and kills what is addressed to it;
- with PostgreSQL, hears other instances' store changes (NOTIFY) for the cached store
  (:mod:`trisocks.store.cache`, which :func:`trisocks.server.serve.serve` keeps in sync).

The admin API of any instance lists the fleet's sessions (its own live, the others' from the
directory, up to one publish old) and kills any of them through :meth:`FleetNode.kill`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

import trio

from trisocks.config import Config, is_db_url
from trisocks.fleet.channel import Channel, Kill, LocalChannel, PostgresChannel
from trisocks.fleet.directory import Directory, Instance
from trisocks.sessions import SessionRegistry, SessionView
from trisocks.store.sql import SqliteDatabase

if TYPE_CHECKING:
    from trisocks.store.interface import UserStore

__all__ = ["FleetNode", "fleet_enabled"]

log = logging.getLogger("trisocks.fleet")

HEARTBEAT = 1.0
"""Seconds between publishes when nothing changes (well under ``STALE_AFTER``)."""
PUBLISH_GAP = 0.2
"""Least seconds between publishes: a burst of new sessions is published as one."""


def fleet_enabled(config: Config) -> bool:
    """Whether this server takes part in a fleet (see the module docstring)."""
    return config.workers > 1 or is_db_url(config.db)


class FleetNode:
    """Publishes the sessions of *registry* to *directory* and kills what *channel* brings."""

    def __init__(self, registry: SessionRegistry, directory: Directory, channel: Channel) -> None:
        self.registry = registry
        self.directory = directory
        self.channel = channel
        self.instance = Instance(_instance_id(), channel.address)
        self.started_at = time.time()
        self._changed = trio.Event()
        registry.instance = self.instance.id
        registry.add_listener(lambda _event, _session: self._changed.set())

    @classmethod
    def open(cls, config: Config, store: UserStore, registry: SessionRegistry) -> FleetNode:
        """Connect to the directory of ``config.db`` (blocking: migrations run), the database
        *store* serves, for the sessions of *registry*."""
        from trisocks.store.cache import CachedStore

        if isinstance(store, CachedStore) and is_db_url(config.db):
            from trisocks.store.postgres import PostgresStore

            assert isinstance(store.backend, PostgresStore)
            db = store.backend.db
            channel: Channel = PostgresChannel(store.backend.url, store.backend.notify,
                                               store.refresh_soon)
            return cls(registry, Directory(db), channel)
        assert not is_db_url(config.db), "a PostgreSQL store is served through its cache"
        sqlite = SqliteDatabase(Path(config.db))
        try:
            return cls(registry, Directory(sqlite), LocalChannel(_instance_id()))
        except BaseException:
            sqlite.close()
            raise

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Take part until cancelled; ``started`` once kills are heard and this instance is
        in the directory. On the way out the instance leaves the directory.
        """
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.channel.run, self._on_kill)
                await self._publish()
                log.info("fleet: instance %s joined", self.instance.id)
                task_status.started()
                await self._publish_forever()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await trio.to_thread.run_sync(self.directory.retire, self.instance.id)
                except Exception as exc:
                    log.warning("fleet: could not leave the directory: %s", exc)
            if isinstance(self.directory.db, SqliteDatabase):
                self.directory.db.close()

    async def _publish_forever(self) -> None:
        while True:
            with trio.move_on_after(HEARTBEAT):
                await self._changed.wait()
            self._changed = trio.Event()
            try:
                await self._publish()
            except Exception as exc:  # the database is away: sessions go on, listing lags
                log.warning("fleet: publishing sessions failed: %s", exc)
            await trio.sleep(PUBLISH_GAP)

    async def _publish(self) -> None:
        rows = [s.view() for s in self.registry]
        await trio.to_thread.run_sync(self.directory.publish, self.instance, self.started_at,
                                      rows, time.time())

    def _on_kill(self, kill: Kill) -> None:
        if kill.instance == self.instance.id and self.registry.kill(kill.session, kill.reason):
            log.info("fleet: session %s killed on request (%s)", kill.session, kill.reason)

    async def remote_sessions(self) -> list[SessionView]:
        """The other instances' live sessions, as the directory last had them."""
        rows = await trio.to_thread.run_sync(
            lambda: self.directory.sessions(time.time(), besides=self.instance.id))
        return rows

    async def kill(self, session_id: str, reason: str) -> bool:
        """Ask the instance serving *session_id* to kill it; ``False`` if none does."""
        owner = await trio.to_thread.run_sync(
            lambda: self.directory.owner(session_id, time.time(), besides=self.instance.id))
        if owner is None:
            return False
        await self.channel.send(owner, Kill(owner.id, session_id, reason))
        return True


def _instance_id() -> str:
    return f"{socket.gethostname()}/{os.getpid()}"
