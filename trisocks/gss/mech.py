"""The ``gssapi`` package (MIT krb5 underneath) behind the small surface RFC 1961 needs.

Importing this module needs the optional extra ``trisocks[gssapi]``. Every call that may block
(acquiring credentials reads the keytab, an initiator's first step asks the KDC for a ticket,
an acceptor's step writes the replay cache) is a plain method here, for the caller to run in a
worker thread; :class:`Protection` (wrap/unwrap) is cheap and runs on the trio thread.
"""

from __future__ import annotations

from pathlib import Path

import gssapi
from gssapi.raw.misc import GSSError

from trisocks.gss.stream import GssFailure
from trisocks.protocol.gssapi import MAX_TOKEN, ProtectionLevel

__all__ = ["Acceptor", "Initiator", "Protection", "default_realm"]

Flag = gssapi.RequirementFlag


def _security_context(**kwargs: object) -> gssapi.SecurityContext:
    context = gssapi.SecurityContext(**kwargs)  # type: ignore[arg-type]
    # By default a failed step returns the mechanism's error token and raises later. RFC 1961
    # has no place for that token (a failure is answered with 01 FF), so raise at once. (The
    # class attribute is forced on by gssapi's metaclass, hence the instance attribute.)
    context.__DEFER_STEP_ERRORS__ = False  # type: ignore[attr-defined]
    return context


class Protection:
    """An established context wrapping at one protection level (RFC 1961 §5)."""

    def __init__(self, context: gssapi.SecurityContext, level: ProtectionLevel) -> None:
        self._context = context
        self._confidential = level == ProtectionLevel.CONFIDENTIALITY
        self.max_plaintext: int = context.get_wrap_size_limit(MAX_TOKEN, self._confidential)

    def wrap(self, data: bytes) -> bytes:
        return bytes(self._context.wrap(data, self._confidential).message)

    def unwrap(self, token: bytes) -> bytes:
        try:
            result = self._context.unwrap(token)
        except GSSError as exc:
            raise GssFailure(f"token rejected: {exc.gen_message()}") from None
        # Level 1 MUST wrap without confidentiality and level 2 with it (§5): a token at the
        # other level is a downgrade (or confusion) either way.
        if result.encrypted != self._confidential:
            raise GssFailure("token not wrapped at the agreed protection level")
        return bytes(result.message)


class _Context:
    """What both sides do with a context: step, then the protection-level octet."""

    _context: gssapi.SecurityContext

    @property
    def complete(self) -> bool:
        return bool(self._context.complete)

    def step(self, token: bytes | None) -> bytes | None:
        """The next context token to send, if any (blocking: run in a thread)."""
        try:
            out = self._context.step(token)
        except GSSError as exc:
            raise GssFailure(exc.gen_message()) from None
        return bytes(out) if out else None

    def available_levels(self) -> frozenset[ProtectionLevel]:
        """Levels the context can give (RFC 1961 §4.1: the ret_flags INTEG and CONF)."""
        flags = self._context.actual_flags
        levels = set()
        if Flag.integrity in flags:
            levels.add(ProtectionLevel.INTEGRITY)
            if Flag.confidentiality in flags:
                levels.add(ProtectionLevel.CONFIDENTIALITY)
        return frozenset(levels)

    def wrap_level(self, octet: bytes) -> bytes:
        """§4.4: the level octet is wrapped with conf_req FALSE."""
        return bytes(self._context.wrap(octet, False).message)

    def unwrap_level(self, token: bytes) -> bytes:
        try:
            return bytes(self._context.unwrap(token).message)
        except GSSError as exc:
            raise GssFailure(f"protection-level token rejected: {exc.gen_message()}") from None

    def protection(self, level: ProtectionLevel) -> Protection:
        return Protection(self._context, level)


class Acceptor(_Context):
    """The server's side of one context, for ``service@<any host>`` in the keytab."""

    def __init__(self, service: str, keytab: Path | None) -> None:
        """Blocking (reads the keytab). *keytab* None: ``KRB5_KTNAME`` or the default one.

        Raises:
            GssFailure: no usable key for the service.
        """
        # "service@" with no host: accept a ticket for service/<any host> in the keytab, so a
        # proxy known by several names (or behind a load balancer) needs no per-host setup.
        name = gssapi.Name(f"{service}@", gssapi.NameType.hostbased_service)
        store: dict[bytes | str, bytes | str] | None = (
            {"keytab": str(keytab)} if keytab is not None else None
        )
        try:
            creds = gssapi.Credentials(name=name, usage="accept", store=store)
        except GSSError as exc:
            raise GssFailure(f"no acceptor credentials: {exc.gen_message()}") from None
        self._context = _security_context(creds=creds, usage="accept")

    @property
    def initiator(self) -> str:
        """The authenticated client principal, ``name@REALM``."""
        return str(self._context.initiator_name)


class Initiator(_Context):
    """The client's side: a context with ``service@host`` using the default credentials."""

    def __init__(self, service: str, host: str, level: ProtectionLevel) -> None:
        """Cheap; the first :meth:`step` is what talks to the KDC."""
        name = gssapi.Name(f"{service}@{host}", gssapi.NameType.hostbased_service)
        flags = Flag.mutual_authentication | Flag.integrity | Flag.replay_detection
        if level != ProtectionLevel.INTEGRITY:
            flags |= Flag.confidentiality
        self._context = _security_context(name=name, usage="initiate", flags=flags)


def default_realm() -> str:
    """The realm of the local Kerberos configuration (what a bare name canonicalizes into)."""
    name = gssapi.Name("x", gssapi.NameType.kerberos_principal)
    return str(name.canonicalize(gssapi.MechType.kerberos)).rpartition("@")[2]
