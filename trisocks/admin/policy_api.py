"""``POST /api/reload`` and per-user limits: ``GET``/``PUT /api/users/{name}/limits``.

Limits live in the store, as with ``trisocks user limits``; the server reads them at each
request and every half second for quotas and rates, so a change applies without a reload.
Any identity may have limits: a store user, or an external account such as ``ldap:alice``
(kept by name; it needs no row in ``users``).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from quart import Blueprint
from werkzeug.exceptions import BadRequest, NotFound

from trisocks.admin.bodies import json_body
from trisocks.config import ConfigError
from trisocks.policy.quotas import LIMIT_FIELDS, UserLimits, check_limit
from trisocks.server.reload import reload_config
from trisocks.store.records import StoreError, is_external

if TYPE_CHECKING:
    from trisocks.server.context import ServerContext

__all__ = ["policy_blueprint", "policy_json"]


def policy_json(ctx: ServerContext, name: str) -> dict[str, Any]:
    """A user's own limits and the bytes its quotas count now (today, this month)."""
    day, month = ctx.accountant.period_usage(name, time.time())
    return {"limits": ctx.store.user_limits(name).as_dict(),
            "quota_used": {"day": day, "month": month}}


def _limits(body: dict[str, Any], current: UserLimits) -> UserLimits:
    """*current* with the fields *body* names; ``null`` clears one."""
    unknown = set(body) - set(LIMIT_FIELDS)
    if unknown:
        raise BadRequest(f"{sorted(unknown)[0]}: unknown limit (known: {', '.join(LIMIT_FIELDS)})")
    for field, value in body.items():
        try:
            check_limit(field, value)
        except ValueError as exc:
            raise BadRequest(f"{field}: {exc}") from None
    return UserLimits(**{**current.as_dict(), **body})


def policy_blueprint(ctx: ServerContext) -> Blueprint:
    """``POST /api/reload`` and ``GET``/``PUT /api/users/{name}/limits`` for *ctx*."""
    bp = Blueprint("policy", __name__)

    @bp.post("/api/reload")
    async def reload() -> dict[str, Any]:
        try:
            return reload_config(ctx)
        except ConfigError as exc:  # logged by reload_config; the running config stays
            raise BadRequest(f"config rejected, nothing changed: {exc}") from None

    def require_account(name: str) -> None:
        """A store user must exist; an external account (``ldap:alice``) needs no row."""
        if not is_external(name) and not ctx.store.has_user(name):
            raise NotFound(f"no user {name!r}")

    @bp.get("/api/users/<name>/limits")
    async def get_limits(name: str) -> dict[str, Any]:
        require_account(name)
        return policy_json(ctx, name)

    @bp.put("/api/users/<name>/limits")
    async def set_limits(name: str) -> dict[str, Any]:
        require_account(name)
        limits = _limits(await json_body(LIMIT_FIELDS), ctx.store.user_limits(name))
        try:
            ctx.store.set_user_limits(name, limits)
        except StoreError as exc:  # removed meanwhile by another process
            raise NotFound(str(exc)) from None
        return policy_json(ctx, name)

    return bp
