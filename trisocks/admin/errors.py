"""Every error answer is ``{"error": "..."}`` with its HTTP status, including Werkzeug's own
404/405 and bad-JSON cases, so clients parse one shape."""

from __future__ import annotations

from typing import Any

from quart import request
from werkzeug.exceptions import BadRequest, HTTPException

__all__ = ["json_body", "json_error"]


async def json_error(exc: HTTPException) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Answer any HTTP error as ``{"error": ...}`` with its status (401 names the scheme)."""
    headers = {"WWW-Authenticate": 'Bearer realm="trisocks"'} if exc.code == 401 else {}
    return {"error": exc.description or exc.name}, exc.code or 500, headers


async def json_body() -> dict[str, Any]:
    """The request body as a JSON object; 400 if it is anything else."""
    body = await request.get_json(force=True, silent=True)
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body
