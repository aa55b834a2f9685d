"""The ``pam`` password backend: RFC 1929 credentials checked by the host's PAM stack.

Each check runs ``pam_authenticate`` and then ``pam_acct_mgmt`` (a locked or expired account
is refused even with the right password) for the service ``pam_service``
(``/etc/pam.d/<service>``; ``deploy/pam.d/trisocks`` is a Debian one), through python-pam.
PAM modules block (``pam_unix`` sleeps about two seconds after a wrong password, others ask a
network service), so every check runs in a worker thread, at most :data:`THREADS` at once,
each with its own PAM handle (a handle must not be shared between threads).

A refusal (a wrong password, an unknown user, a locked or expired account) is ``None``. A
service that is not installed, or PAM failing in itself (a broken module, the system or a
service it needs unavailable), is a :class:`BackendError`: without a file for the service,
libpam would silently use ``/etc/pam.d/other``, so the backend checks that one exists first.

An empty password, or a name that is not UTF-8 or holds a NUL, is refused without asking PAM.
The identity's groups are the user's groups in the host's group database (``getgrouplist``),
by name.
"""

from __future__ import annotations

import grp
import os
import pwd
from pathlib import Path
from typing import TYPE_CHECKING

import pam
import trio

from trisocks.identity.model import BackendError, Identity, LoginRequest

if TYPE_CHECKING:
    from trisocks.config.settings import Config

__all__ = ["REFUSALS", "SERVICE_DIRS", "THREADS", "PamBackend", "host_groups"]

THREADS = 4
"""PAM checks running at once."""
SERVICE_DIRS = (Path("/etc/pam.d"), Path("/usr/lib/pam.d"))
"""Where libpam looks for a service's file."""
REFUSALS = frozenset({
    pam.PAM_AUTH_ERR, pam.PAM_USER_UNKNOWN, pam.PAM_PERM_DENIED, pam.PAM_MAXTRIES,
    pam.PAM_ACCT_EXPIRED, pam.PAM_AUTHTOK_EXPIRED, pam.PAM_NEW_AUTHTOK_REQD,
    pam.PAM_CRED_INSUFFICIENT, pam.PAM_CRED_EXPIRED,
})
"""PAM results that mean "these credentials do not log in"; any other failure is PAM not
answering."""


def host_groups(name: str) -> frozenset[str]:
    """The names of the groups *name* is in, in the host's group database (its primary group
    included); empty if the host does not know *name*."""
    try:
        entry = pwd.getpwnam(name)
        gids = os.getgrouplist(name, entry.pw_gid)
    except (KeyError, OSError):
        return frozenset()
    names = set()
    for gid in gids:
        try:
            names.add(grp.getgrgid(gid).gr_name)
        except KeyError:
            continue  # a gid without a name in the group database
    return frozenset(names)


class PamBackend:
    """Checks logins against the PAM service ``config.pam_service`` (module docstring)."""

    source = "pam"

    def __init__(self, config: Config, *, threads: int = THREADS) -> None:
        self.service = config.pam_service
        self._limiter = trio.CapacityLimiter(threads)

    def _service_file(self) -> bool:
        if not SERVICE_DIRS[0].is_dir():
            return True  # then libpam reads /etc/pam.conf: let it decide
        return any((d / self.service).is_file() for d in SERVICE_DIRS)

    def _check(self, name: str, password: bytes) -> Identity | None:
        if "/" in self.service or not self._service_file():
            raise BackendError(f"PAM service {self.service!r} is not installed "
                               f"(no /etc/pam.d/{self.service})")
        handle = pam.pam()
        try:
            ok = handle.authenticate(name, password, service=self.service, resetcreds=False)
        except ValueError as exc:  # a NUL (refused before this point) or a bad argument
            raise BackendError(f"PAM refused the call: {exc}") from None
        if ok:
            return Identity("pam", name, host_groups(name))
        if handle.code in REFUSALS:
            return None
        raise BackendError(f"PAM service {self.service!r}: {handle.reason} (code {handle.code})")

    async def login(self, request: LoginRequest) -> Identity | None:
        """The ``pam`` identity the credentials prove, or ``None``.

        Raises:
            BackendError: the service is not installed, or PAM failed in itself.
        """
        try:
            name = request.user.decode()
        except UnicodeDecodeError:
            return None
        if not name or not request.password or "\0" in name or b"\0" in request.password:
            return None
        return await trio.to_thread.run_sync(
            self._check, name, request.password, limiter=self._limiter)

    async def revalidate(self, identity: Identity, request: LoginRequest) -> bool:
        """A fresh check with the credentials of the login: a locked or removed account, or a
        changed password, is no longer valid."""
        fresh = await self.login(request)
        return fresh is not None and fresh.name == identity.name

    async def aclose(self) -> None:
        pass
