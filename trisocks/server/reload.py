"""Reloading the configuration of a running server (SIGHUP, ``POST /api/reload``).

Rules of a reload:

1. The new config is read and checked in full before anything changes; a broken one is
   rejected with the error logged, and the server keeps the config it has.
2. Keys that shape what is already bound or opened (listeners, db, admin endpoint, relay
   engine, logging) keep their running values; a change to them is logged as needing a restart.
3. Live sessions keep going, except those the new rules or the user set no longer allow:
   they are ended with the reason in the log
   (:func:`trisocks.server.revocation.revoke_disallowed`).
4. This host's interface addresses (``@local``, ``@admin`` on a wildcard) are read again.
5. The TLS certificate and key (and client CA) are read again: new TLS handshakes use them,
   live TLS sessions keep the context they started with; files that do not load reject the
   reload like a broken config.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import attrs

from trisocks.config import ConfigError
from trisocks.identity.build import IDENTITY_KEYS, build_logins
from trisocks.logs import quote
from trisocks.server.egress import check_egress
from trisocks.server.revocation import revoke_disallowed
from trisocks.tls import server_context

if TYPE_CHECKING:
    from trisocks.server.context import ServerContext

__all__ = ["RESTART_KEYS", "reload_config"]

log = logging.getLogger("trisocks.server")

RESTART_KEYS = ("listen", "db", "admin", "admin_token", "admin_token_file", "relay_engine",
                "log_format", "log_level")


def reload_config(ctx: ServerContext) -> dict[str, Any]:
    """Re-read the config (``ctx.load_config``) and apply it.

    Returns:
        What changed: ``rules`` (how many now), ``ended`` (sessions revoked) and
        ``restart_needed`` (keys that changed but keep their running value).
    Raises:
        ConfigError: the new config is broken (or there is nothing to re-read); nothing changed.
    """
    try:
        if ctx.load_config is None:
            raise ConfigError("reload: this server was not started from a config to re-read")
        new = ctx.load_config()
    except ConfigError as exc:
        ctx.stats.reloads["failed"] += 1
        log.error("reload rejected, keeping the running config: %s", exc)
        raise
    old = ctx.config
    restart = sorted(k for k in RESTART_KEYS if getattr(new, k) != getattr(old, k))
    if restart:
        log.warning("reload: %s changed; that takes a restart", ", ".join(restart))
    try:  # the files may have changed since load_config checked them
        tls_context = server_context(new)
        for problem in check_egress(new)[:1]:  # the new rules' source addresses, on this host
            raise ConfigError(problem)
    except ConfigError as exc:
        ctx.stats.reloads["failed"] += 1
        log.error("reload rejected, keeping the running config: %s", exc)
        raise
    ctx.config = attrs.evolve(new, **{k: getattr(old, k) for k in RESTART_KEYS})
    ctx.tls_context = tls_context  # new handshakes; live sessions keep the one they had
    ctx.admission.configure(ctx.config)  # the other parts read ctx.config as they go
    ctx.judge.read_local_addresses()
    ctx.resolver.configure(ctx.config)  # new lookups; answers kept unless the servers changed
    orphans: list[str] = []
    if any(getattr(new, k) != getattr(old, k) for k in IDENTITY_KEYS):
        retired = ctx.logins
        ctx.retired_logins.append(retired)  # in-flight logins finish on it
        ctx.logins = build_logins(ctx.config, ctx.authenticator, retired.counts)
        orphans = ctx.logins.adopt(retired)  # live identities are revalidated by the new one
    ended = revoke_disallowed(ctx.judge, ctx.store)
    for account in orphans:  # their source left password_backends: nothing vouches for them
        source = account.partition(":")[0]
        for session in [s for s in ctx.registry if s.user == account]:
            log.info("session %s (%s): reload: %s is no longer a password backend",
                     session.id, quote(account), source)
            session.kill(f"reload: {source} is no longer a password backend")
            ended += 1
    ctx.stats.reloads["ok"] += 1
    log.info("reloaded config: %d rules (default %s); %d sessions ended",
             len(ctx.config.rules), ctx.config.rules_default, ended)
    return {"rules": len(ctx.config.rules), "ended": ended, "restart_needed": restart}
