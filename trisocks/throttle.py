"""What a rate limit looks like to whatever moves bytes (the relay, the GSSAPI stream)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

__all__ = ["Throttle"]

Throttle = Callable[[int], Awaitable[None]]
"""Awaited after each chunk with its size (a rate limit sleeps in it); ``None`` when no limit
applies, so the unthrottled path pays one ``is None`` test per chunk and nothing else."""
