"""The JSON shapes of the admin API, in one place: the dashboard and the CLI rely on these names.

Times are ISO 8601 in UTC; addresses are ``host:port`` with IPv6 in brackets, as the session
records already hold them.
"""

from __future__ import annotations

import datetime
from typing import Any

from trisocks.sessions import Session

__all__ = ["iso_time", "session_json", "usage_json"]


def iso_time(timestamp: float | None) -> str | None:
    """Seconds since the epoch as ``2024-05-01T12:00:00.123Z``; ``None`` stays ``None``."""
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def session_json(session: Session) -> dict[str, Any]:
    """The session shape of the API (issue 4): ids, addresses, state and live counters."""
    c = session.counters
    return {
        "id": session.id,
        "user": session.user,
        "client": session.client,
        "command": session.command,
        "target": session.target,
        "resolved": session.resolved,
        "protocol": session.protocol,
        "tls": session.tls,
        "state": session.state,
        "started_at": iso_time(session.started_at),
        "bytes_up": c.bytes_up,
        "bytes_down": c.bytes_down,
        "datagrams_up": c.datagrams_up,
        "datagrams_down": c.datagrams_down,
        "instance": session.instance,
    }


def usage_json(row: dict[str, Any]) -> dict[str, Any]:
    """One row of :meth:`trisocks.accounting.Accountant.live_usage`, with ``last_seen`` as ISO."""
    return {**row, "last_seen": iso_time(row["last_seen"])}
