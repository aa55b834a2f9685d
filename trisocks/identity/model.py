"""An identity is (source, name): who vouched for a session's user, and the name it gave.

Names from different sources cannot be confused because they are qualified: an identity's
*account* (what accounting, limits, quotas, rules and kills key on, and what the API shows as
``user``) is the bare name for the store, and ``source:name`` for every other source
(``ldap:alice``, ``pam:bob``, ``http:carol``, ``gssapi:dave``, ``tls:erin``). The store refuses
new names that start with a source's prefix, so no store user can stand for an external one.
"""

from __future__ import annotations

from typing import Protocol

import attrs

from trisocks.config.keys import PASSWORD_BACKENDS

__all__ = ["EXTERNAL_SOURCES", "PASSWORD_BACKENDS", "SOURCES", "BackendError", "Identity",
           "LoginRequest", "PasswordBackend", "account_name", "parse_account"]

SOURCES = (*PASSWORD_BACKENDS, "gssapi", "tls")
"""Every source an identity may come from."""
EXTERNAL_SOURCES = tuple(s for s in SOURCES if s != "store")


def account_name(source: str, name: str) -> str:
    """The account of *name* from *source*: the bare name for the store, else qualified."""
    return name if source == "store" else f"{source}:{name}"


def parse_account(account: str) -> tuple[str, str]:
    """``(source, name)`` of an account name (:func:`account_name` read back)."""
    source, sep, name = account.partition(":")
    if sep and source in EXTERNAL_SOURCES:
        return source, name
    return "store", account


@attrs.frozen
class Identity:
    """Who vouched (*source*) for whom (*name*, as the source spells it), and the groups the
    source says the identity is in (LDAP groups, the hook's ``groups``; rules name them
    ``@group``)."""

    source: str
    name: str
    groups: frozenset[str] = frozenset()

    @property
    def account(self) -> str:
        return account_name(self.source, self.name)


class BackendError(Exception):
    """The backend could not answer (down, timed out, a malformed reply). The login fails
    closed (RFC 1929 status 01); a live session is not ended for it."""


@attrs.frozen
class LoginRequest:
    """One login attempt, as a backend sees it."""

    user: bytes
    password: bytes = attrs.field(repr=False)
    client: str = ""
    """The client's IP address (text)."""
    listener: str = ""
    """The listener it came to, ``host:port``."""
    method: str = "socks5"
    """How the credentials came: ``socks5`` (RFC 1929) or ``http`` (``Proxy-Authorization``)."""


class PasswordBackend(Protocol):
    """One place RFC 1929 logins are checked (``password_backends``)."""

    @property
    def source(self) -> str:
        """One of :data:`PASSWORD_BACKENDS`."""

    async def login(self, request: LoginRequest) -> Identity | None:
        """The identity the credentials prove; ``None`` when the backend refuses them (a wrong
        password, or a user it does not know: the next backend is asked).

        Raises:
            BackendError: no answer.
        """

    async def revalidate(self, identity: Identity, request: LoginRequest) -> bool:
        """Whether *identity*, which logged in with *request*, is still valid (a fresh check
        for external backends).

        Raises:
            BackendError: no answer (live sessions are kept).
        """

    async def aclose(self) -> None:
        """Release connections and threads."""
