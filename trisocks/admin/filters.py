"""Selecting sessions from query parameters, shared by ``GET`` and ``DELETE /api/sessions``.

Unknown parameters and malformed values are errors rather than ignored: a typo in a kill
filter must not widen the selection.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from trisocks.protocol import Command
from trisocks.sessions import COMMAND_NAMES, COMMANDS_BY_NAME, SessionView

__all__ = ["FilterError", "SessionFilter"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class FilterError(ValueError):
    """A query parameter is unknown or its value is malformed (answered with 400)."""


def _network(text: str) -> Network:
    try:
        return ipaddress.ip_network(text, strict=False)
    except ValueError:
        raise FilterError(f"client: {text!r} is not an IP address or CIDR network") from None


def _port(text: str) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and 0 < int(text) <= 65535):
        raise FilterError(f"target_port: {text!r} is not a port number 1..65535")
    return int(text)


def _command(text: str) -> Command:
    command = COMMANDS_BY_NAME.get(text.upper())
    if command is None:
        raise FilterError(f"command: {text!r} is not one of {', '.join(COMMAND_NAMES.values())}")
    return command


@attrs.frozen
class SessionFilter:
    """All given conditions must hold; an empty filter selects every session."""

    user: str | None = None
    command: Command | None = None
    """Given by name: ``CONNECT``, ``BIND``, ``UDP``, ``RESOLVE`` or ``RESOLVE_PTR``."""
    client: Network | None = None
    """The client's address lies in this network."""
    target_host: str | None = None
    """The host as the client asked for it (case-insensitive)."""
    target_port: int | None = None

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> SessionFilter:
        """Build a filter from query parameters; raise :class:`FilterError` on bad input."""
        unknown = sorted(set(args) - set(_PARSERS))
        if unknown:
            raise FilterError(
                f"unknown filter {unknown[0]!r}; known: {', '.join(_PARSERS)}"
            )
        getlist = getattr(args, "getlist", None)  # a MultiDict keeps repeated parameters
        repeated = sorted(key for key in args if getlist and len(getlist(key)) > 1)
        if repeated:
            raise FilterError(f"{repeated[0]}: given more than once")
        return cls(**{key: _PARSERS[key](value) for key, value in args.items()})

    @property
    def is_empty(self) -> bool:
        return self == SessionFilter()

    def __call__(self, session: SessionView) -> bool:
        if self.user is not None and session.user != self.user:
            return False
        if self.command is not None and session.command != self.command:
            return False
        if self.client is not None and session.client_ip not in self.client:
            return False
        if self.target_host is not None or self.target_port is not None:
            if session.target is None:
                return False
            target = session.target
            if self.target_host is not None and target.host.lower() != self.target_host.lower():
                return False
            if self.target_port is not None and target.port != self.target_port:
                return False
        return True


_PARSERS: dict[str, Callable[[str], Any]] = {
    "user": str,
    "command": _command,
    "client": _network,
    "target_host": str,
    "target_port": _port,
}
