"""The JSON shapes of the admin API, in one place: the dashboard and the CLI rely on these names.

Times are ISO 8601 in UTC; addresses are ``host:port`` with IPv6 in brackets, as the session
records already hold them.
"""

from __future__ import annotations

import datetime
from typing import Any

from trisocks.identity.model import parse_account
from trisocks.sessions import SessionView
from trisocks.store.records import ANONYMOUS

__all__ = ["iso_time", "session_json", "source_of", "usage_json"]


def iso_time(timestamp: float | None) -> str | None:
    """Seconds since the epoch as ``2024-05-01T12:00:00.123Z``; ``None`` stays ``None``."""
    if timestamp is None:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


API_ONLY = ("reply", "rule", "userid", "close_reason")
"""View fields the session shape leaves out (the access log has them)."""


def session_json(view: SessionView) -> dict[str, Any]:
    """The session shape of the API (issue 4): ids, addresses, state and live counters."""
    fields = view.text()
    for key in API_ONLY:
        del fields[key]
    fields["started_at"] = iso_time(view.started_at)
    return fields


def source_of(account: str) -> str | None:
    """The source an account name says vouched for it (``store``, ``ldap``, ...;
    :func:`~trisocks.identity.model.parse_account`); ``None`` for anonymous sessions."""
    return None if account == ANONYMOUS else parse_account(account)[0]


def usage_json(row: dict[str, Any]) -> dict[str, Any]:
    """One row of :meth:`trisocks.accounting.Accountant.live_usage`, with ``last_seen`` as ISO
    and the account's ``source``."""
    return {**row, "source": source_of(row["user"]), "last_seen": iso_time(row["last_seen"])}
