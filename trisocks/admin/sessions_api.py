"""``/api/sessions`` and ``/api/events``: list, inspect and kill live sessions.

Killing cancels the session's scope (:meth:`trisocks.sessions.Session.kill`); its handler's own
``async with``/``finally`` blocks close every socket as the cancellation unwinds, so the answer
can be sent at once.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from quart import Blueprint, Response, request
from quart.typing import ResponseReturnValue
from werkzeug.exceptions import BadRequest, NotFound

from trisocks.admin.events import EventHub
from trisocks.admin.filters import FilterError, SessionFilter
from trisocks.admin.shapes import session_json
from trisocks.server.revocation import KILLED_BY_ADMIN
from trisocks.sessions import SessionView

if TYPE_CHECKING:
    from trisocks.server.context import ServerContext

__all__ = ["sessions_blueprint"]

async def _selection(ctx: ServerContext) -> tuple[SessionFilter, list[SessionView]]:
    """The sessions the query's filter selects: this process's, and in a fleet the other
    instances' too (views from the directory, :mod:`trisocks.fleet.node`)."""
    try:
        selector = SessionFilter.from_args(request.args)
    except FilterError as exc:
        raise BadRequest(str(exc)) from None
    sessions = [view for s in ctx.registry if selector(view := s.view())]
    if ctx.fleet is not None:
        sessions += filter(selector, await ctx.fleet.remote_sessions())
    return selector, sorted(sessions, key=lambda s: (s.started_at, s.id))


async def _kill(ctx: ServerContext, view: SessionView) -> None:
    if ctx.registry.kill(view.id, KILLED_BY_ADMIN):
        return
    if ctx.fleet is not None and view.instance != ctx.registry.instance:
        await ctx.fleet.kill(view.id, KILLED_BY_ADMIN)


def sessions_blueprint(ctx: ServerContext, hub: EventHub) -> Blueprint:
    """``/api/sessions`` (list, inspect, kill; fleet-wide when in a fleet) and
    ``/api/events`` (fed by *hub*)."""
    bp = Blueprint("sessions", __name__)

    async def lookup(session_id: str) -> SessionView:
        session = ctx.registry.get(session_id)
        if session is not None:
            return session.view()
        if ctx.fleet is not None:
            remote = await ctx.fleet.remote_sessions()
            view = next((s for s in remote if s.id == session_id), None)
            if view is not None:
                return view
        raise NotFound(f"no live session {session_id!r}")

    @bp.get("/api/sessions")
    async def list_sessions() -> dict[str, Any]:
        _, sessions = await _selection(ctx)
        return {"sessions": [session_json(s) for s in sessions]}

    @bp.delete("/api/sessions")
    async def kill_sessions() -> dict[str, Any]:
        selector, sessions = await _selection(ctx)
        if selector.is_empty:
            raise BadRequest("give at least one filter (user, command, client, target_host, "
                             "target_port); an empty one would kill every session")
        for session in sessions:
            await _kill(ctx, session)
        return {"killed": len(sessions)}

    @bp.get("/api/sessions/<session_id>")
    async def get_session(session_id: str) -> dict[str, Any]:
        return session_json(await lookup(session_id))

    @bp.delete("/api/sessions/<session_id>")
    async def kill_session(session_id: str) -> ResponseReturnValue:
        await _kill(ctx, await lookup(session_id))
        return "", 204

    @bp.get("/api/events")
    async def events() -> ResponseReturnValue:
        response = Response(hub.stream(), content_type="text/event-stream",
                            headers={"Cache-Control": "no-cache"})
        response.timeout = None  # quart's RESPONSE_TIMEOUT would end the stream after 60 s
        return response

    return bp
