"""``GET /metrics``: Prometheus text, computed at scrape time from the live server state.

A custom collector reads ``ctx.stats``, the session registry and the accountant when scraped,
so the proxy's hot path updates plain integers and never a metrics library. Per-user series
keep label cardinality bounded: the ``top_users`` users by bytes get their own series, every
other user is folded into ``user="(other)"``. Users are accounts of every source (``alice``
from the store, ``ldap:alice``, ``gssapi:bob``: :mod:`trisocks.identity.model`).
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from trisocks.sessions import COMMAND_NAMES

if TYPE_CHECKING:
    from trisocks.server.context import ServerContext
    from trisocks.store.records import UserUsage

__all__ = ["OTHER_USERS", "ProxyCollector", "fold_users", "login_counts", "metrics_registry",
           "relayed_bytes"]

OTHER_USERS = "(other)"
USER_FIELDS = ("sessions_total", "bytes_up", "bytes_down", "datagrams_up", "datagrams_down")


def _counter(name: str, doc: str, labels: list[str], samples: dict[Any, int]) -> Metric:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(samples.items()):
        family.add_metric(list(key) if isinstance(key, tuple) else [key], value)
    return family


def relayed_bytes(ctx: ServerContext) -> tuple[int, int]:
    """Payload bytes (up, down) since start: ended sessions plus what live ones moved so far."""
    live = list(ctx.registry)
    return (ctx.stats.bytes_up + sum(s.counters.bytes_up for s in live),
            ctx.stats.bytes_down + sum(s.counters.bytes_down for s in live))


def login_counts(ctx: ServerContext) -> dict[tuple[str, str], int]:
    """``(backend, result) -> logins`` from the chain's counters (``ctx.logins.counts``), every
    configured backend with all three results (zero included, so a rate query sees it)."""
    logins = getattr(ctx, "logins", None)
    counts = getattr(logins, "counts", None)
    if logins is None or counts is None:
        return {}
    backends = [getattr(b, "source", "?") for b in getattr(logins, "backends", ())]
    samples: dict[tuple[str, str], int] = {}
    for result, counter in (("accepted", counts.accepted), ("refused", counts.refused),
                            ("error", counts.errors)):
        for backend in {*backends, *counter}:
            samples[(backend, result)] = counter[backend]
    return samples


def fold_users(rows: list[dict[str, Any]], top: int) -> list[dict[str, Any]]:
    """The *top* users by bytes moved, then one ``(other)`` row summing the rest."""
    ranked = sorted(rows, key=lambda r: (-(r["bytes_up"] + r["bytes_down"]), r["user"]))
    kept, rest = ranked[:top], ranked[top:]
    if rest:
        sums = {field: sum(r[field] for r in rest) for field in ("active_sessions", *USER_FIELDS)}
        kept.append({"user": OTHER_USERS, **sums})
    return kept


class ProxyCollector:
    """A prometheus_client collector over one server's state."""

    def __init__(self, ctx: ServerContext, *, top_users: int = 20,
                 persisted: list[UserUsage] | None = None) -> None:
        """*persisted*: the store's per-user rows, read off the loop for this scrape
        (:meth:`trisocks.accounting.Accountant.read_all`); ``None`` reads them in ``collect``."""
        self._ctx = ctx
        self._top_users = top_users
        self._persisted = persisted

    def collect(self) -> Iterator[Metric]:
        ctx, stats = self._ctx, self._ctx.stats
        live = list(ctx.registry)
        sessions = GaugeMetricFamily(
            "trisocks_sessions", "Live sessions by command (none before the request) and state.",
            labels=["command", "state"],
        )
        by_kind = collections.Counter(
            (COMMAND_NAMES[s.command] if s.command else "none", s.state) for s in live)
        for (command, state), count in sorted(by_kind.items()):
            sessions.add_metric([command, state], count)
        yield sessions
        yield CounterMetricFamily(
            "trisocks_sessions_started", "Sessions accepted since the server started.",
            value=ctx.registry.total,
        )
        up, down = relayed_bytes(ctx)
        yield _counter("trisocks_bytes", "Payload bytes relayed (up: client to target).",
                       ["direction"], {"up": up, "down": down})
        yield _counter("trisocks_sessions_by_protocol",
                       "Sessions ended, by the protocol the client spoke.", ["protocol"],
                       dict(stats.protocols))
        yield _counter("trisocks_handshake_failures", "Handshakes that failed, by reason.",
                       ["reason"], dict(stats.handshake_failures))
        yield _counter("trisocks_udp_datagrams_dropped", "UDP datagrams dropped, by reason.",
                       ["reason"], dict(stats.udp_dropped))
        yield CounterMetricFamily("trisocks_udp_reassemblies",
                                  "UDP fragment sequences reassembled.", value=stats.reassembled)
        yield CounterMetricFamily(
            "trisocks_connections_rejected",
            "Connections closed at accept because max_sessions was reached.",
            value=stats.rejected_over_limit,
        )
        yield _counter("trisocks_limited", "Connections or requests refused by a limit.",
                       ["limit"], dict(stats.limited))
        yield _counter("trisocks_denied", "Requests and UDP datagrams denied, by rule id.",
                       ["rule"], dict(stats.denied))
        yield _counter("trisocks_reloads", "Config reloads, by outcome.", ["outcome"],
                       dict(stats.reloads))
        yield _counter("trisocks_replies", "Final SOCKS replies sent, by REP code.", ["rep"],
                       {f"{rep:02x}": n for rep, n in stats.replies.items()})
        yield GaugeMetricFamily("trisocks_uptime_seconds", "Seconds since the server started.",
                                value=trio.current_time() - stats.started_at)
        yield _counter("trisocks_logins", "Password logins per backend (password_backends), by "
                       "result: accepted, refused, error (the backend could not answer).",
                       ["backend", "result"], login_counts(ctx))
        yield _counter("trisocks_parent_sessions", "Connections made through a via parent, "
                       "by parent (scheme://host:port).", ["parent"], dict(stats.parent_sessions))
        yield _counter("trisocks_parent_failures", "Times a via parent failed and was skipped "
                       "(marked down for via_down_for), by parent.", ["parent"],
                       dict(stats.parent_failures))
        yield CounterMetricFamily(
            "trisocks_dns_queries", "DNS questions sent to the resolvers (A and AAAA count one "
            "each; answers from the cache or hosts ask none; 0 with the system resolver).",
            value=ctx.resolver.queries)
        yield from self._per_user()

    def _per_user(self) -> Iterator[Metric]:
        rows = fold_users(self._ctx.accountant.live_usage(persisted=self._persisted),
                          self._top_users)
        active = GaugeMetricFamily("trisocks_user_active_sessions", "Live sessions per user.",
                                   labels=["user"])
        for row in rows:
            active.add_metric([row["user"]], row["active_sessions"])
        yield active
        yield _counter("trisocks_user_sessions", "Sessions per user since the user was created.",
                       ["user"], {r["user"]: r["sessions_total"] for r in rows})
        for unit in ("bytes", "datagrams"):
            yield _counter(
                f"trisocks_user_{unit}", f"Payload {unit} per user since the user was created.",
                ["user", "direction"],
                {(r["user"], way): r[f"{unit}_{way}"] for r in rows for way in ("up", "down")},
            )


def metrics_registry(
    ctx: ServerContext, persisted: list[UserUsage] | None = None
) -> CollectorRegistry:
    """A registry of its own per server (the global one would mix servers in one process),
    made for one scrape when *persisted* is given (see :class:`ProxyCollector`)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ProxyCollector(ctx, persisted=persisted))
    return registry
