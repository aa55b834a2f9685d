"""What a session holds beyond its connection: BIND listeners and UDP associations.

They are capped per owner (:meth:`Reservations.owner`: the user, or, unauthenticated, the
client group), and UDP sockets server-wide (``udp_sockets``). A reservation is given back by
:meth:`Reservations.release` or at the session's end, whichever comes first.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from trisocks.logs import quote
from trisocks.policy.limits import Counts, client_group
from trisocks.protocol import Reply
from trisocks.sessions import Session, SessionRegistry

if TYPE_CHECKING:
    from trisocks.config import Config
    from trisocks.server.stats import Stats

__all__ = ["UDP_SOCKETS_PER_ASSOCIATION", "Reservations"]

log = logging.getLogger("trisocks.policy")

UDP_SOCKETS_PER_ASSOCIATION = 2
"""What a UDP association takes of ``udp_sockets``: the socket facing the client and its one
dual-stack outbound socket (reserved up front, so the outbound one never fails for want of
budget halfway through an association)."""


class Reservations:
    """BIND listeners and UDP associations held, by owner, and the UDP socket budget.

    *config* gives the running config (its caps are read at each reservation); refusals are
    counted in *stats*; *registry* tells when a session ends (its reservation is released).
    """

    def __init__(
        self, config: Callable[[], Config], stats: Stats, registry: SessionRegistry
    ) -> None:
        self._config = config
        self._stats = stats
        self.binds = Counts()
        self.udp = Counts()
        """BIND listeners and UDP associations held, by :meth:`owner`."""
        self.udp_sockets = 0
        """UDP sockets reserved by live associations."""
        self._held: dict[Session, tuple[str, object]] = {}
        registry.on_end(self.release)

    @staticmethod
    def owner(session: Session) -> tuple[str, object]:
        """Whom per-user caps count *session* under: its user, or, unauthenticated, its client
        group (one anonymous key would let one client lock out every other one)."""
        if session.user is not None:
            return ("user", session.user)
        return ("client", client_group(session.client_ip))

    def reserve(self, session: Session, kind: str) -> Reply | None:
        """Hold a BIND listener (*kind* ``"bind"``) or a UDP association (``"udp"``) for
        *session* until :meth:`release` or the session's end.

        Returns:
            ``None`` when held. Otherwise the REP to refuse with, the refusal counted in
            ``stats.limited``, logged and made the close reason: REP 02 (not allowed) for the
            owner's own cap (``max_binds_per_user``, ``max_udp_per_user``), REP 01 (general
            failure) when the server's ``udp_sockets`` budget is used up.
        """
        config = self._config()
        owner = self.owner(session)
        counts, cap, limit, what = (
            (self.binds, config.max_binds_per_user, "user_binds", "BIND listeners")
            if kind == "bind"
            else (self.udp, config.max_udp_per_user, "user_udp", "UDP associations")
        )
        name = quote(session.user) if session.user is not None else f"client {owner[1]}"
        if cap is not None and counts[owner] >= cap:
            reply, why = Reply.NOT_ALLOWED, f"{name} holds {cap} {what} already"
        elif kind == "udp" and self.udp_sockets + UDP_SOCKETS_PER_ASSOCIATION > config.udp_sockets:
            limit, reply = "udp_sockets", Reply.GENERAL_FAILURE
            why = f"the server's {config.udp_sockets} UDP sockets are all in use"
        else:
            counts.acquire(owner, None)
            if kind == "udp":
                self.udp_sockets += UDP_SOCKETS_PER_ASSOCIATION
            self._held[session] = (kind, owner)
            return None
        self._stats.limited[limit] += 1
        log.info("session %s: %s refused: %s", session.id, kind.upper(), why)
        session.close_reason = why
        return reply

    def release(self, session: Session) -> None:
        """Give back what :meth:`reserve` holds for *session* (nothing if it holds nothing)."""
        held = self._held.pop(session, None)
        if held is None:
            return
        kind, owner = held
        if kind == "bind":
            self.binds.release(owner)
        else:
            self.udp.release(owner)
            self.udp_sockets -= UDP_SOCKETS_PER_ASSOCIATION

