"""``/api/users``: per-user accounting (live: persisted + pending + running sessions) and
user management on the same store as ``trisocks user ...``.

Removing a user or changing its password revokes at once: its live sessions end and the
authenticator forgets its cached credentials (:func:`trisocks.server.revocation.revoke`).

Every identity is listed, whatever vouched for it: the store's users (with or without usage)
and every account of another source (``ldap:alice``, ``gssapi:bob``: :mod:`trisocks.identity`)
that has persisted usage or a live session. Each row names its ``source``. Such an account
has no password here; its sessions can be ended and its limits set like a store user's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio
from quart import Blueprint
from quart.typing import ResponseReturnValue
from werkzeug.exceptions import BadRequest, Conflict, NotFound

from trisocks.admin.bodies import json_body
from trisocks.admin.policy_api import policy_json
from trisocks.admin.shapes import usage_json
from trisocks.passwords import hash_password
from trisocks.server.revocation import kill_user_sessions, revoke
from trisocks.store.records import ANONYMOUS, StoreError, is_external
from trisocks.usernames import normalize_username

if TYPE_CHECKING:
    from trisocks.server.context import ServerContext

__all__ = ["users_blueprint"]


def _password(body: dict[str, Any]) -> bytes:
    password = body.get("password")
    if not isinstance(password, str):
        raise BadRequest("password: expected a string")
    raw = password.encode()
    if not 1 <= len(raw) <= 255:  # RFC 1929 PLEN
        raise BadRequest(f"password: must be 1..255 bytes (RFC 1929), got {len(raw)}")
    return raw


def users_blueprint(ctx: ServerContext) -> Blueprint:
    """``/api/users``: accounting and user management on ``ctx.store`` (module docstring)."""
    bp = Blueprint("users", __name__)

    def usage(name: str) -> list[dict[str, Any]]:
        # Usage of a removed user can linger until a flush lands; only existing accounts count.
        listed = name == ANONYMOUS or is_external(name) or ctx.store.has_user(name)
        accounts = {name} if listed else set()
        return [usage_json(r) for r in ctx.accountant.live_usage(name) if r["user"] in accounts]

    def require_user(name: str) -> None:
        if not ctx.store.has_user(name):
            raise NotFound(f"no user {name!r}")

    @bp.get("/api/users")
    async def list_users() -> dict[str, Any]:
        persisted, names = await ctx.accountant.read_all()  # every user: off the loop
        accounts = {*names, ANONYMOUS}
        rows = ctx.accountant.live_usage(persisted=persisted)
        return {"users": [usage_json(r) for r in rows
                          if r["user"] in accounts or is_external(str(r["user"]))]}

    @bp.get("/api/users/<name>")
    async def get_user(name: str) -> dict[str, Any]:
        rows = usage(name)
        if not rows:
            raise NotFound(f"no user {name!r}")
        return {**rows[0], **policy_json(ctx, name)}

    @bp.post("/api/users")
    async def add_user() -> ResponseReturnValue:
        body = await json_body(("user", "password"))
        name = body.get("user")
        if not isinstance(name, str):
            raise BadRequest("user: expected a string")
        try:
            name = normalize_username(name)
        except ValueError as exc:
            raise BadRequest(f"user: {exc}") from None
        password_hash = await trio.to_thread.run_sync(hash_password, _password(body))
        try:
            ctx.store.add_user(name, password_hash)
        except StoreError as exc:  # the name was valid, so it is taken
            raise Conflict(str(exc)) from None
        return usage(name)[0], 201

    @bp.delete("/api/users/<name>")
    async def remove_user(name: str) -> ResponseReturnValue:
        try:
            ctx.store.remove_user(name)
        except StoreError as exc:
            raise NotFound(str(exc)) from None
        revoke(ctx.registry, ctx.authenticator, name)
        return "", 204

    @bp.put("/api/users/<name>/password")
    async def set_password(name: str) -> ResponseReturnValue:
        require_user(name)
        password = _password(await json_body(("password",)))
        password_hash = await trio.to_thread.run_sync(hash_password, password)
        try:
            ctx.store.set_password(name, password_hash)
        except StoreError as exc:  # removed by another process while hashing
            raise NotFound(str(exc)) from None
        revoke(ctx.registry, ctx.authenticator, name)
        return "", 204

    @bp.delete("/api/users/<name>/sessions")
    async def kill_sessions(name: str) -> dict[str, Any]:
        if not is_external(name):  # any external account, live sessions or not
            require_user(name)
        return {"killed": kill_user_sessions(ctx.registry, name)}

    return bp
