"""The OpenAPI document stays true: it validates, names exactly the app's routes, and live
answers of the main routes validate against its schemas."""

from __future__ import annotations

import re
from typing import Any

import httpx
import jsonschema
import trio
from openapi_spec_validator import validate

from tests.admin_support import admin_proxy, api, echo_round, session_of
from tests.conftest import USER, Proxy, open_connect
from trisocks.admin.app import create_app
from trisocks.admin.events import EventHub
from trisocks.admin.openapi import OPENAPI

__all__ = ["admin_proxy", "api"]  # fixtures used by name

IGNORED_METHODS = {"HEAD", "OPTIONS"}


def test_document_is_valid_openapi() -> None:
    validate(OPENAPI)


async def test_document_names_exactly_the_apps_routes(admin_proxy: Proxy) -> None:
    app = create_app(admin_proxy.ctx, "unused", EventHub(admin_proxy.ctx.registry))
    routes = {
        (re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule), method.lower())
        for rule in app.url_map.iter_rules()
        for method in rule.methods or ()
        if method not in IGNORED_METHODS
    }
    documented = {(path, method) for path, item in OPENAPI["paths"].items() for method in item}
    assert routes == documented


def check(response: httpx.Response, path: str) -> Any:
    """Validate *response* against the document's schema for *path* and its status."""
    method = response.request.method.lower()
    documented = OPENAPI["paths"][path][method]["responses"]
    assert str(response.status_code) in documented, (path, method, response.status_code)
    content = documented[str(response.status_code)].get("content", {})
    if "application/json" not in content:
        assert not response.content or response.status_code == 200
        return None
    schema = {**content["application/json"]["schema"], "components": OPENAPI["components"]}
    jsonschema.validate(response.json(), schema, cls=jsonschema.Draft202012Validator)
    return response.json()


async def test_live_answers_match_the_schemas(
    admin_proxy: Proxy, api: httpx.AsyncClient, echo_server: tuple[str, int]
) -> None:
    with trio.fail_after(10):
        async with await open_connect(admin_proxy, echo_server) as stream:
            await echo_round(stream, b"o" * 100)
            session = await session_of(api)
            check(await api.get("/api/sessions"), "/api/sessions")
            check(await api.get(f"/api/sessions/{session['id']}"), "/api/sessions/{session_id}")
            check(await api.get("/api/users"), "/api/users")
            check(await api.get(f"/api/users/{USER}"), "/api/users/{name}")
            check(await api.get("/api/stats"), "/api/stats")
            check(await api.get("/healthz"), "/healthz")
            check(await api.delete("/api/sessions", params={"user": "nobody"}), "/api/sessions")
            check(await api.delete(f"/api/sessions/{session['id']}"), "/api/sessions/{session_id}")
        created = await api.post("/api/users", json={"user": "dora", "password": "pw"})
        assert check(created, "/api/users")["user"] == "dora"
        check(await api.put("/api/users/dora/password", json={"password": "pw2"}),
              "/api/users/{name}/password")
        check(await api.delete("/api/users/dora/sessions"), "/api/users/{name}/sessions")
        check(await api.delete("/api/users/dora"), "/api/users/{name}")
        # Errors have the documented shape too.
        check(await api.get("/api/users/dora"), "/api/users/{name}")
        check(await api.get("/api/sessions", params={"command": "x"}), "/api/sessions")
        check(await api.post("/api/users", json={"user": USER, "password": "pw"}), "/api/users")
        check(await api.get("/api/stats", headers={"Authorization": "Bearer no"}), "/api/stats")
        assert (await api.get("/api/openapi.json")).json() == OPENAPI
