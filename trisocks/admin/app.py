"""Build the admin app: bearer-token check, JSON errors, and the route blueprints."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, Unauthorized

import admin_ui
from trisocks.admin.errors import json_error, store_errors, unavailable, unexpected_error
from trisocks.admin.events import EventHub
from trisocks.admin.policy_api import policy_blueprint
from trisocks.admin.sessions_api import sessions_blueprint
from trisocks.admin.static import static_blueprint
from trisocks.admin.status_api import status_blueprint
from trisocks.admin.tokens import check_bearer
from trisocks.admin.users_api import users_blueprint

if TYPE_CHECKING:
    from trisocks.server.context import ServerContext

__all__ = ["create_app"]

MAX_BODY = 64 * 1024
"""Request bodies are small JSON objects; refuse anything bigger early (413)."""

SECURITY_HEADERS = {
    # A header rather than a <meta> tag: frame-ancestors only works in a header.
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
"""Sent with every admin response, errors and the event stream included."""


def create_app(
    ctx: ServerContext, token: str, hub: EventHub, *, static_dir: Path = admin_ui.STATIC_DIR
) -> QuartTrio:
    """The quart-trio app for one server.

    Args:
        ctx: the server whose sessions, store and counters the routes read and change.
        token: the bearer token every ``/api`` route (and ``/metrics`` unless
            ``metrics_public``) requires.
        hub: fans out ``/api/events``.
        static_dir: the dashboard's files.
    """
    app = QuartTrio(__name__, static_folder=None)  # no /static route: the dashboard is at /
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY

    @app.before_request
    async def read_body() -> None:
        # Receive the whole body (at most MAX_BODY, else 413) before anything can answer: a
        # 401, 404 or 405 sent while the body is still arriving can leave Hypercorn's
        # keep-alive connection stuck, and the client's next request unanswered.
        try:
            await request.get_data(cache=True)
        except RequestEntityTooLarge:
            raise RequestEntityTooLarge(f"the request body is over {MAX_BODY} bytes") from None

    @app.before_request
    async def require_token() -> None:
        path = request.path
        protected = path.startswith("/api/") or (
            path == "/metrics" and not ctx.config.metrics_public
        )
        if protected and not check_bearer(request.headers.get("Authorization"), token):
            raise Unauthorized("missing or wrong bearer token")

    @app.after_request
    async def security_headers(response: Response) -> Response:
        response.headers.update(SECURITY_HEADERS)
        return response

    app.register_error_handler(HTTPException, json_error)
    for error_type in (*store_errors(ctx.store), OSError):
        app.register_error_handler(error_type, unavailable)
    app.register_error_handler(Exception, unexpected_error)  # the last resort: no HTML page
    app.register_blueprint(sessions_blueprint(ctx, hub))
    app.register_blueprint(users_blueprint(ctx))
    app.register_blueprint(policy_blueprint(ctx))
    app.register_blueprint(status_blueprint(ctx))
    app.register_blueprint(static_blueprint(static_dir))
    return app
