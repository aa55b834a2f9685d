"""Per-user limits and byte quotas.

A user's limits live in the store (``user_limits``, managed with ``trisocks user limits`` and
the admin API); any field left unset falls back to the server-wide setting, or to no limit.
Quotas count payload bytes in both directions, per UTC day and per UTC calendar month, from the
store's per-day table plus what the accountant has not flushed yet, so a quota is exact to the
byte counters, not to the flush interval.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any

import attrs

__all__ = ["LIMIT_FIELDS", "MAX_LIMIT", "UserLimits", "check_limit", "parse_size", "period_starts",
           "quota_exceeded"]

_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


@attrs.frozen
class UserLimits:
    """One user's own limits; ``None`` means "the server-wide setting, if any"."""

    max_sessions: int | None = None
    """Sessions at once."""
    max_session_duration: float | None = None
    """Seconds a session may last."""
    rate_up: int | None = None
    """Bytes per second, client to targets, over all the user's sessions together."""
    rate_down: int | None = None
    quota_day: int | None = None
    """Bytes (both directions) per UTC day."""
    quota_month: int | None = None
    """Bytes (both directions) per UTC calendar month."""

    def as_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


LIMIT_FIELDS = tuple(f.name for f in attrs.fields(UserLimits))

MAX_LIMIT = (1 << 63) - 1
"""The largest value a limit may have: SQLite INTEGER and PostgreSQL BIGINT are 64-bit signed."""


def check_limit(field: str, value: object) -> None:
    """Check one of :class:`UserLimits`' fields before it is stored (``None`` clears it).

    ``max_session_duration`` takes any finite number, the others whole numbers; all must be
    greater than 0 and at most :data:`MAX_LIMIT` (a NaN duration would reach trio as a deadline).

    Raises:
        ValueError: the message says what is wrong, without the field's name.
    """
    if value is None:
        return
    number = (int, float) if field == "max_session_duration" else (int,)
    if isinstance(value, bool) or not isinstance(value, number):
        raise ValueError(f"expected a positive {'number' if len(number) == 2 else 'whole number'}"
                         f" or null, got {value!r}")
    if not value > 0:  # also NaN
        raise ValueError(f"must be greater than 0, got {value!r}")
    if not value <= MAX_LIMIT:
        raise ValueError(f"must be at most {MAX_LIMIT}, got {value!r}")


def parse_size(text: str) -> int:
    """``1500``, ``64k``, ``10M``, ``2GiB`` -> bytes (binary units).

    Raises:
        ValueError: not a size.
    """
    match = _SIZE.fullmatch(text.strip())
    size = float(match[1]) * _UNITS[match[2].lower()] if match else math.nan
    if not math.isfinite(size):  # int(inf) would raise OverflowError
        raise ValueError(f"{text!r} is not a size (like 500, 64k, 10M, 2G)")
    return int(size)


def period_starts(now: float) -> tuple[str, str]:
    """The UTC day and the first day of its month, as the store's ``day`` keys."""
    day = time.strftime("%Y-%m-%d", time.gmtime(now))
    return day, day[:8] + "01"


def quota_exceeded(limits: UserLimits, used_day: int, used_month: int) -> str | None:
    """Which quota is used up (``daily``/``monthly``), or ``None``."""
    if limits.quota_day is not None and used_day >= limits.quota_day:
        return "daily"
    if limits.quota_month is not None and used_month >= limits.quota_month:
        return "monthly"
    return None
