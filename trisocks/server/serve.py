"""The top of the process: listeners, the session nursery, accounting (and the admin API).

Shape (STYLE §6): the sessions nursery sits outside the accepting nursery, so stopping means
"stop accepting, close the listeners, give live sessions ``shutdown_grace`` seconds, cancel
what is left, flush accounting".
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable

import trio
from trio.lowlevel import wait_readable

from trisocks.accounting import Accountant
from trisocks.config import Config
from trisocks.fleet.node import FleetNode, fleet_enabled
from trisocks.fleet.workers import worker_index
from trisocks.identity.store import Authenticator
from trisocks.net import format_sockaddr
from trisocks.server import resolver
from trisocks.server.context import ServerContext
from trisocks.server.engines import make_engine
from trisocks.server.hub import Hub
from trisocks.server.listeners import open_listeners
from trisocks.server.revocation import CredentialWatcher, IdentityWatcher, QuotaWatcher
from trisocks.server.session import handle_client
from trisocks.sessions import SessionRegistry
from trisocks.store.cache import CachedStore
from trisocks.store.interface import UserStore
from trisocks.tls import server_context

__all__ = ["AdminService", "serve"]

log = logging.getLogger("trisocks.server")

_OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
ACCEPT_BACKOFF = 0.1
ACCEPT_BURST = 64
"""Connections accepted in a row before the accept loop yields to the sessions it started."""


def build_context(config: Config, store: UserStore) -> ServerContext:
    registry = SessionRegistry()
    engine = make_engine(config.relay_engine)
    return ServerContext(
        config=config,
        store=store,
        registry=registry,
        authenticator=Authenticator(store),
        accountant=Accountant(store, registry),
        engine=engine,
        hub=Hub(splice=engine.name == "splice"),
        tls_context=server_context(config),
    )


async def _accept_loop(
    listener: trio.SocketListener,
    sessions: trio.Nursery,
    ctx: ServerContext,
    tls: bool = False,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept until cancelled, every pending connection per wake-up (*tls*: a TLS listener's).

    The loop calls ``accept(2)`` itself on its own duplicate of the listening descriptor:
    ``SocketListener.accept`` passes through the scheduler once per connection even when one
    was waiting, and a burst of connections would pay that once each.

    Resource handling: out of descriptors (EMFILE and friends), it logs once, backs off and
    tries again; the kernel keeps the waiting connections in the listen queue meanwhile.
    """
    out_of_fds = False
    burst = 0
    with socket.socket(fileno=os.dup(listener.socket.fileno())) as raw:
        raw.setblocking(False)
        task_status.started()  # the duplicate exists: running out of fds can't stop us now
        while True:
            if burst >= ACCEPT_BURST:  # let the sessions just accepted run
                burst = 0
                await trio.lowlevel.checkpoint()
            try:
                sock, _ = raw.accept()
                burst += 1
            except BlockingIOError:
                burst = 0
                await wait_readable(raw)
                continue
            except OSError as exc:
                if exc.errno not in _OUT_OF_RESOURCES:
                    raise
                if not out_of_fds:  # log once per episode, not once per retry
                    log.error("accept: %s; pausing accepts until resources free up",
                              exc.strerror)
                    out_of_fds = True
                await trio.sleep(ACCEPT_BACKOFF)
                continue
            stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
            if out_of_fds:
                log.warning("accept: resources available again")
                out_of_fds = False
            if len(ctx.registry) >= ctx.config.max_sessions:
                ctx.stats.rejected_over_limit += 1
                await trio.aclose_forcefully(stream)
                continue
            sessions.start_soon(handle_client, stream, ctx, tls)


AdminService = Callable[..., Awaitable[None]]
"""Serves the admin API for a context: started as ``nursery.start(service, ctx)``, it reports
the address it bound (:func:`trisocks.admin.server.serve_admin`)."""


async def serve(
    config: Config,
    store: UserStore,
    *,
    admin: AdminService | None = None,
    task_status: trio.TaskStatus[ServerContext] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the proxy until ``ctx.shutdown`` is set; ``task_status.started`` gets the context
    once every listener is bound (``ctx.listening`` holds their addresses).

    *admin* serves the admin API where ``config.admin`` asks for it; it lives above this layer
    (:func:`trisocks.admin.server.serve_with_admin` passes it), so without one there is none.

    Resource handling: listeners are closed when accepting stops; sessions get
    ``config.shutdown_grace`` seconds, then are cancelled; accounting is flushed last.
    """
    ctx = build_context(config, store)
    token = resolver.CURRENT.set(ctx.resolver)  # this server's tasks look names up with it
    try:
        await _run(ctx, admin, task_status=task_status)
    finally:
        resolver.CURRENT.reset(token)
        await _close_logins(ctx)


async def _run(
    ctx: ServerContext,
    admin: AdminService | None,
    *,
    task_status: trio.TaskStatus[ServerContext],
) -> None:
    config, store = ctx.config, ctx.store
    async with contextlib.AsyncExitStack() as stack, trio.open_nursery() as root:
        if isinstance(store, CachedStore):  # writes leave, others' writes arrive
            root.start_soon(store.run)
        root.start_soon(ctx.accountant.run, config.accounting_flush_interval)
        if ctx.hub is not None:
            await root.start(ctx.hub.run)
        await root.start(CredentialWatcher(ctx.store, ctx.registry, ctx.authenticator).run)
        await root.start(QuotaWatcher(ctx.user_limits, ctx.registry, ctx.stats).run)
        await root.start(IdentityWatcher(lambda: ctx.logins, ctx.registry,
                                         lambda: ctx.config.auth_revalidate_interval).run)
        if fleet_enabled(config):
            ctx.fleet = await trio.to_thread.run_sync(
                FleetNode.open, ctx.config, ctx.store, ctx.registry)
            await root.start(ctx.fleet.run)
        if config.admin is not None:  # @admin matches it before the first accept
            infos = await trio.socket.getaddrinfo(config.admin.host, config.admin.port,
                                                  type=socket.SOCK_STREAM)
            ctx.admin_address = (str(infos[0][4][0]), config.admin.port)
        listeners: list[trio.SocketListener] = []
        tls_listeners: set[trio.SocketListener] = set()
        for endpoint in config.listen:
            for listener in await open_listeners(endpoint, reuse_port=config.workers > 1):
                stack.push_async_callback(listener.aclose)
                listeners.append(listener)
                if endpoint.tls:
                    tls_listeners.add(listener)
        ctx.listening = [listener.socket.getsockname()[:2] for listener in listeners]
        for listener, address in zip(listeners, ctx.listening, strict=True):
            log.info("listening on %s%s (auth: %s)", "tls://" * (listener in tls_listeners),
                     format_sockaddr(address), ",".join(config.auth))
        if "socks4" in config.protocols and "none" not in config.auth:
            log.warning("protocols: socks4 is enabled but has no password: with auth %s every "
                        "SOCKS4 request is refused (5B) unless TLS identified its client",
                        ",".join(config.auth))
        async with trio.open_nursery() as sessions:
            async with trio.open_nursery() as accepting:
                for listener in listeners:
                    await accepting.start(
                        _accept_loop, listener, sessions, ctx, listener in tls_listeners
                    )
                if admin is not None:
                    await _start_admin(root, ctx, admin)
                task_status.started(ctx)
                await ctx.shutdown.wait()
                accepting.cancel_scope.cancel()
            await stack.aclose()  # stop listening before draining
            if len(ctx.registry):
                log.info(
                    "shutting down: %d live sessions get %.0fs to finish",
                    len(ctx.registry), config.shutdown_grace,
                )
            sessions.cancel_scope.deadline = trio.current_time() + config.shutdown_grace
        root.cancel_scope.cancel()
    ctx.engine.close()
    log.info("stopped")



async def _close_logins(ctx: ServerContext) -> None:
    """Close the password backends (the hook's HTTP client...), even when cancelled."""
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        for logins in (*ctx.retired_logins, ctx.logins):
            await logins.aclose()


async def _start_admin(root: trio.Nursery, ctx: ServerContext, admin: AdminService) -> None:
    """The admin API joins the root nursery (see trisocks.admin); off when ``admin`` is None."""
    if ctx.config.admin is None or worker_index():  # worker 0 serves it for all
        return
    ctx.admin_address = await root.start(admin, ctx)
