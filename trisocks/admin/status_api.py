"""Server-level routes: ``/healthz`` (public), ``/api/stats``, ``/metrics``, the OpenAPI
document."""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from quart import Blueprint, Response
from quart.typing import ResponseReturnValue

from trisocks.admin.metrics import metrics_registry, relayed_bytes
from trisocks.admin.openapi import OPENAPI
from trisocks.admin.shapes import iso_time
from trisocks.sessions import COMMAND_NAMES, STATES

if TYPE_CHECKING:
    from trisocks.server.context import ServerContext

__all__ = ["status_blueprint"]


def _stats(ctx: ServerContext) -> dict[str, Any]:
    stats, live = ctx.stats, list(ctx.registry)
    uptime = trio.current_time() - stats.started_at
    by_state = collections.Counter(s.state for s in live)
    by_command = collections.Counter(COMMAND_NAMES[s.command] for s in live if s.command)
    bytes_up, bytes_down = relayed_bytes(ctx)
    return {
        "started_at": iso_time(time.time() - uptime),
        "uptime": round(uptime, 3),
        "sessions_active": len(live),
        "sessions_total": ctx.registry.total,
        "sessions_by_state": {state: by_state[state] for state in STATES},
        "sessions_by_command": {name: by_command[name] for name in COMMAND_NAMES.values()},
        "bytes_up": bytes_up,
        "bytes_down": bytes_down,
        "handshake_failures": dict(stats.handshake_failures),
        "udp_dropped": dict(stats.udp_dropped),
        "udp_reassembled": stats.reassembled,
        "rejected_over_limit": stats.rejected_over_limit,
        "instance": ctx.registry.instance,
    }


def status_blueprint(ctx: ServerContext) -> Blueprint:
    """``/healthz``, ``/api/stats``, ``/metrics`` and ``/api/openapi.json`` for *ctx*."""
    bp = Blueprint("status", __name__)

    @bp.get("/healthz")
    async def healthz() -> ResponseReturnValue:
        # The admin server starts once the listeners are bound; it says so until shutdown.
        if ctx.shutdown.is_set():
            return {"status": "stopping"}, 503
        return {"status": "ok"}

    @bp.get("/api/stats")
    async def stats() -> dict[str, Any]:
        return _stats(ctx)

    @bp.get("/metrics")
    async def metrics() -> Response:
        persisted, _ = await ctx.accountant.read_all()  # every user: off the loop
        registry = metrics_registry(ctx, persisted)
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)

    @bp.get("/api/openapi.json")
    async def openapi() -> dict[str, Any]:
        return OPENAPI

    return bp
