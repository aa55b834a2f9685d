"""The live session directory: which instance serves which session, shared through the store.

Each instance (a ``trisocks serve`` process, or one of its workers) republishes its sessions
every heartbeat, in one transaction that also stamps its heartbeat. Readers trust an instance's
rows while its heartbeat is younger than :data:`STALE_AFTER`: a crashed instance's sessions
drop out of every listing within that time, and the next publisher deletes them.

The tables are the ``fleet`` component's migrations (:func:`trisocks.store.sql.migrate`), in
SQL that SQLite and PostgreSQL share. All methods block; callers use ``trio.to_thread``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from trisocks.net import parse_hostport
from trisocks.sessions import COMMANDS_BY_NAME, SessionView
from trisocks.store.sql import Database, migrate

__all__ = ["STALE_AFTER", "Directory", "Instance", "row_of", "view_of"]

STALE_AFTER = 5.0
"""Seconds without a heartbeat after which an instance counts as gone."""

MIGRATIONS = (
    """
    CREATE TABLE fleet_instances (
        instance TEXT PRIMARY KEY,
        channel TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        heartbeat DOUBLE PRECISION NOT NULL
    );
    CREATE TABLE fleet_sessions (
        instance TEXT NOT NULL,
        id TEXT NOT NULL,
        client TEXT NOT NULL,
        username TEXT,
        command TEXT,
        target TEXT,
        resolved TEXT,
        state TEXT NOT NULL,
        started_at DOUBLE PRECISION NOT NULL,
        bytes_up BIGINT NOT NULL,
        bytes_down BIGINT NOT NULL,
        datagrams_up BIGINT NOT NULL,
        datagrams_down BIGINT NOT NULL,
        PRIMARY KEY (instance, id)
    )
    """,
    # 2: how the client spoke (docs/protocols.md), and whether over TLS
    """
    ALTER TABLE fleet_sessions ADD COLUMN protocol TEXT NOT NULL DEFAULT 'socks5';
    ALTER TABLE fleet_sessions ADD COLUMN tls INTEGER NOT NULL DEFAULT 0
    """,
    # 3: which identity source vouched for the user (issue 14)
    """
    ALTER TABLE fleet_sessions ADD COLUMN source TEXT
    """,
    # 4: the via parent a session went through (issue 16)
    """
    ALTER TABLE fleet_sessions ADD COLUMN parent TEXT
    """,
)

_COLUMNS = ("instance, id, client, username, command, target, resolved, state, started_at, "
            "bytes_up, bytes_down, datagrams_up, datagrams_down, protocol, tls, source, parent")


_SESSION_COLUMNS = ", ".join(f"s.{c.strip()}" for c in _COLUMNS.split(","))


@attrs.frozen
class Instance:
    """One serving process."""

    id: str
    """``host/pid``: unique while it runs."""
    channel: str
    """Where its kill requests go (:mod:`trisocks.fleet.channel`)."""


def row_of(instance: str, view: SessionView) -> tuple[Any, ...]:
    """*view* as a row of ``fleet_sessions`` (:data:`_COLUMNS`' order)."""
    text = view.text()
    return (instance, view.id, text["client"], view.user, text["command"], text["target"],
            text["resolved"], view.state, view.started_at, view.bytes_up, view.bytes_down,
            view.datagrams_up, view.datagrams_down, view.protocol, int(view.tls), view.source,
            view.parent)


def view_of(row: Sequence[Any]) -> SessionView:
    """A row of ``fleet_sessions`` back as a view: the admin API's filters and JSON shape work
    on another instance's sessions as on this one's."""
    (instance, session_id, client, user, command, target, resolved, state, started_at,
     bytes_up, bytes_down, datagrams_up, datagrams_down, protocol, tls, source, parent) = row
    return SessionView(
        session_id, user, parse_hostport(client), COMMANDS_BY_NAME.get(command),
        None if target is None else parse_hostport(target),
        None if resolved is None else parse_hostport(resolved), protocol, bool(tls), state,
        started_at, bytes_up, bytes_down, datagrams_up, datagrams_down, instance,
        source=source, parent=parent,
    )


class Directory:
    def __init__(self, db: Database) -> None:
        self.db = db
        migrate(db, "fleet", MIGRATIONS)

    def publish(self, instance: Instance, started_at: float, sessions: Sequence[SessionView],
                now: float) -> None:
        """Replace *instance*'s sessions with *sessions* and stamp its heartbeat; forget
        instances whose heartbeat is stale."""
        with self.db.transaction() as cur:
            cur.execute(
                "INSERT INTO fleet_instances (instance, channel, started_at, heartbeat) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (instance) DO UPDATE SET "
                "channel = excluded.channel, heartbeat = excluded.heartbeat",
                (instance.id, instance.channel, started_at, now),
            )
            stale = [row[0] for row in cur.execute(
                "SELECT instance FROM fleet_instances WHERE heartbeat < ?", (now - STALE_AFTER,))]
            for gone in (*stale, instance.id):
                cur.execute("DELETE FROM fleet_sessions WHERE instance = ?", (gone,))
            cur.execute_many("DELETE FROM fleet_instances WHERE instance = ?",
                             [(gone,) for gone in stale])
            cur.execute_many(
                f"INSERT INTO fleet_sessions ({_COLUMNS}) VALUES ({', '.join('?' * 17)})",
                [row_of(instance.id, view) for view in sessions],
            )

    def retire(self, instance_id: str) -> None:
        """Remove an instance that stops (its sessions are over)."""
        with self.db.transaction() as cur:
            cur.execute("DELETE FROM fleet_sessions WHERE instance = ?", (instance_id,))
            cur.execute("DELETE FROM fleet_instances WHERE instance = ?", (instance_id,))

    def sessions(self, now: float, *, besides: str) -> list[SessionView]:
        """Sessions of every live instance but *besides* (the caller, who knows its own)."""
        rows = self._select("s.instance <> ?", (besides,), now)
        return [view_of(row) for row in rows]

    def owner(self, session_id: str, now: float, *, besides: str) -> Instance | None:
        """The live instance (other than *besides*) serving *session_id*, if any."""
        rows = self._select("s.id = ? AND s.instance <> ?", (session_id, besides), now,
                            columns="i.instance, i.channel")
        return Instance(*rows[0]) if rows else None

    def _select(self, where: str, params: tuple[Any, ...], now: float,
                columns: str = _SESSION_COLUMNS) -> list[tuple[Any, ...]]:
        with self.db.transaction() as cur:
            return cur.execute(
                f"SELECT {columns} FROM fleet_sessions AS s "
                "JOIN fleet_instances AS i ON i.instance = s.instance "
                f"WHERE i.heartbeat >= ? AND {where} ORDER BY s.started_at, s.id",
                (now - STALE_AFTER, *params),
            )
