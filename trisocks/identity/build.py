"""The login chain a config asks for (``password_backends``), and which keys shape it."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from trisocks.identity.logins import LoginCounts, Logins
from trisocks.identity.model import PasswordBackend

if TYPE_CHECKING:
    from trisocks.config import Config
    from trisocks.identity.store import Authenticator

__all__ = ["IDENTITY_KEYS", "build_logins"]

IDENTITY_KEYS = ("password_backends", "pam_service", "ldap_url", "ldap_starttls", "ldap_ca_file",
                 "ldap_user_dn", "ldap_search_base", "ldap_search_filter", "ldap_bind_dn",
                 "ldap_bind_password_file", "ldap_group_attribute", "ldap_timeout",
                 "ldap_pool_size", "auth_hook_url", "auth_hook_timeout", "auth_hook_token_file",
                 "auth_cache_ttl")
"""Config keys the chain is built from: a reload that changes one builds a new chain (new logins
use it; live sessions keep their identity)."""

_BACKENDS = {"pam": ("trisocks.identity.pam", "PamBackend"),
             "ldap": ("trisocks.identity.ldap", "LdapBackend"),
             "http": ("trisocks.identity.hook", "HookBackend")}
"""External backends, imported only when configured (each pulls in its client library)."""


def build_logins(config: Config, store: Authenticator, counts: LoginCounts | None = None
                 ) -> Logins:
    """The chain of ``config.password_backends``; *store* is the store backend. *counts* carry
    over from the chain this one replaces (``/metrics`` counters only grow)."""
    backends: list[PasswordBackend] = []
    for name in config.password_backends:
        if name == "store":
            backends.append(store)
            continue
        module, cls = _BACKENDS[name]
        backends.append(getattr(importlib.import_module(module), cls)(config))
    return Logins(backends, cache_ttl=config.auth_cache_ttl, counts=counts)
