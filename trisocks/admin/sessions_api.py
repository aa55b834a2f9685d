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
from trisocks.admin.revocation import KILLED_BY_ADMIN
from trisocks.admin.shapes import session_json
from trisocks.sessions import Session

if TYPE_CHECKING:
    from trisocks.server.context import ServerContext

__all__ = ["sessions_blueprint"]

def _selection(ctx: ServerContext) -> tuple[SessionFilter, list[Session]]:
    try:
        selector = SessionFilter.from_args(request.args)
    except FilterError as exc:
        raise BadRequest(str(exc)) from None
    sessions = sorted(ctx.registry.select(selector), key=lambda s: (s.started_at, s.id))
    return selector, sessions


def sessions_blueprint(ctx: ServerContext, hub: EventHub) -> Blueprint:
    bp = Blueprint("sessions", __name__)

    def lookup(session_id: str) -> Session:
        session = ctx.registry.get(session_id)
        if session is None:
            raise NotFound(f"no live session {session_id!r}")
        return session

    @bp.get("/api/sessions")
    async def list_sessions() -> dict[str, Any]:
        _, sessions = _selection(ctx)
        return {"sessions": [session_json(s) for s in sessions]}

    @bp.delete("/api/sessions")
    async def kill_sessions() -> dict[str, Any]:
        selector, sessions = _selection(ctx)
        if selector.is_empty:
            raise BadRequest("give at least one filter (user, command, client, target_host, "
                             "target_port); an empty one would kill every session")
        for session in sessions:
            session.kill(KILLED_BY_ADMIN)
        return {"killed": len(sessions)}

    @bp.get("/api/sessions/<session_id>")
    async def get_session(session_id: str) -> dict[str, Any]:
        return session_json(lookup(session_id))

    @bp.delete("/api/sessions/<session_id>")
    async def kill_session(session_id: str) -> ResponseReturnValue:
        lookup(session_id).kill(KILLED_BY_ADMIN)
        return "", 204

    @bp.get("/api/events")
    async def events() -> ResponseReturnValue:
        response = Response(hub.stream(), content_type="text/event-stream",
                            headers={"Cache-Control": "no-cache"})
        response.timeout = None  # quart's RESPONSE_TIMEOUT would end the stream after 60 s
        return response

    return bp
