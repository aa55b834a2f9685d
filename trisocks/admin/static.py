"""The dashboard's static files (``admin_ui``) at ``/``.

Only files with a known extension are served, each with an explicit content type: browsers
refuse JavaScript modules sent with a wrong type, and :mod:`mimetypes` depends on the host's
tables. The extension list also keeps ``__init__.py`` and caches out; ``safe_join`` keeps
requests inside the directory. Anything else is a 404.
"""

from __future__ import annotations

from pathlib import Path

import trio
from quart import Blueprint, Response
from werkzeug.exceptions import NotFound
from werkzeug.security import safe_join

__all__ = ["static_blueprint"]

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
}


def static_blueprint(root: Path) -> Blueprint:
    """Serve the dashboard's files under *root* at ``/`` (module docstring: what is served)."""
    bp = Blueprint("dashboard", __name__)

    @bp.get("/", defaults={"name": "index.html"})
    @bp.get("/<path:name>")
    async def page(name: str) -> Response:
        path = safe_join(str(root), name)
        content_type = CONTENT_TYPES.get(Path(name).suffix.lower())
        if path is None or content_type is None or name.startswith(".") or "/." in name:
            raise NotFound(f"no page {name!r}")
        try:
            data = await trio.Path(path).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise NotFound(f"no page {name!r}") from None
        return Response(data, content_type=content_type,
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})

    return bp
