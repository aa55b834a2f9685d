"""Run the admin app with Hypercorn in the server's root nursery (STYLE §6).

One trio run serves SOCKS and HTTP: no thread, no second process. The admin server stops when
``ctx.shutdown`` is set; open event streams are ended first so that Hypercorn's graceful stop
does not wait for them.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import hypercorn
import hypercorn.trio
import trio

from trisocks.admin.app import create_app
from trisocks.admin.events import EventHub
from trisocks.admin.tokens import resolve_token
from trisocks.server.serve import serve

if TYPE_CHECKING:
    from trisocks.config import Config
    from trisocks.server.context import ServerContext
    from trisocks.store.interface import UserStore

__all__ = ["serve_admin", "serve_with_admin"]

log = logging.getLogger("trisocks.admin")

GRACEFUL_TIMEOUT = 2.0
"""Seconds in-flight admin requests get at shutdown (hypercorn's default is 3)."""


def _hypercorn_config(ctx: ServerContext) -> hypercorn.Config:
    assert ctx.config.admin is not None
    config = hypercorn.Config()
    config.bind = [str(ctx.config.admin)]
    config.accesslog = None
    config.errorlog = log
    config.graceful_timeout = GRACEFUL_TIMEOUT
    return config


async def serve_admin(
    ctx: ServerContext,
    *,
    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the admin API on ``ctx.config.admin`` until ``ctx.shutdown`` is set.

    ``task_status.started`` gets the bound ``(host, port)`` (the real port when 0 was asked).

    Raises:
        OSError: the admin address cannot be bound, or the token file cannot be read/created.
    """
    hub = EventHub(ctx.registry)
    app = create_app(ctx, resolve_token(ctx.config), hub)

    async def shutdown_trigger() -> None:
        await ctx.shutdown.wait()
        hub.close()

    async with trio.open_nursery() as nursery:
        # Both tasks return by themselves at shutdown: the hub once closed, Hypercorn after
        # its graceful stop.
        await nursery.start(hub.run)
        binds = await nursery.start(
            partial(hypercorn.trio.serve, app, _hypercorn_config(ctx),
                    shutdown_trigger=shutdown_trigger)
        )
        bound = urlsplit(binds[0])
        assert bound.hostname is not None and bound.port is not None
        task_status.started((bound.hostname, bound.port))


async def serve_with_admin(
    config: Config,
    store: UserStore,
    *,
    task_status: trio.TaskStatus[ServerContext] = trio.TASK_STATUS_IGNORED,
) -> None:
    """What ``trisocks serve`` runs: the proxy (:func:`trisocks.server.serve.serve`) with the
    admin API beside it in the same trio run, where ``config.admin`` asks for one."""
    await serve(config, store, admin=serve_admin, task_status=task_status)
