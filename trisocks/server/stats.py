"""Server-wide counters, one :class:`Stats` per server (exported by ``/metrics``)."""

from __future__ import annotations

import collections

import attrs
import trio

__all__ = ["Stats"]


@attrs.define
class Stats:
    """Server-wide counters (exported by ``/metrics``)."""

    started_at: float = attrs.field(factory=trio.current_time)
    handshake_failures: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """By reason: timeout, evicted, bad_version, no_acceptable_method, auth_failed, malformed,
    eof, unknown_protocol (the first byte starts no enabled protocol), auth_required (SOCKS4
    where a password is required), tls (a TLS listener's handshake failed, or the client
    spoke no TLS)."""
    protocols: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """Ended sessions by protocol: socks5, socks4, http-connect, http."""
    replies: collections.Counter[int] = attrs.field(factory=collections.Counter)
    """Final REP codes sent."""
    udp_dropped: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """UDP datagrams dropped, by reason: foreign_source, malformed, fragment, not_allowed,
    unreachable (the target did not resolve or the send failed)."""
    reassembled: int = 0
    """UDP fragment sequences reassembled."""
    bytes_up: int = 0
    """Payload bytes of ended sessions (live sessions are added by whoever reads)."""
    bytes_down: int = 0
    rejected_over_limit: int = 0
    """Connections closed at accept because max_sessions was reached."""
    limited: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """Connections or requests refused by a limit: connection_rate, auth_backoff (closed at
    accept), max_handshakes, max_handshakes_per_client (the oldest unfinished handshake
    evicted), user_sessions, quota, user_binds, user_udp (REP 02 or session ended),
    udp_sockets (REP 01)."""
    denied: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """Requests and UDP datagrams denied, by rule id."""
    reloads: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """Config reloads by outcome: ok, failed."""
    parent_sessions: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """Connections made through a ``via`` parent, by its label (``socks5://host:port``)."""
    parent_failures: collections.Counter[str] = attrs.field(factory=collections.Counter)
    """``via`` parents skipped because they failed, by label (:mod:`trisocks.server.parents`)."""
    parents_down: dict[str, float] = attrs.field(factory=dict)
    """Parents marked down, by label: the trio time until which they are skipped."""
