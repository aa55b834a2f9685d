"""Sessions built from the text forms the API and the access log show (``host:port``, command
names), for unit tests of what reads session records."""

from __future__ import annotations

from typing import Any

from trisocks.protocol import Address, AddressType
from trisocks.sessions import COMMANDS_BY_NAME, Session


def address_from_text(text: str) -> Address:
    """``[v6]:port`` as an IPv6 address; any other ``host:port`` as the client would send a name
    (ATYP 03: its text kept exactly, whatever it holds)."""
    host, sep, port = text.rpartition(":")
    assert sep, f"{text!r} has no :port"
    if host.startswith("[") and host.endswith("]"):
        return Address.of(host[1:-1], int(port))
    return Address(host, int(port), AddressType.DOMAIN)


def session_from_text(session_id: str, client: str, **fields: Any) -> Session:
    """A detached :class:`Session`: *client*, ``target`` and ``resolved`` as ``host:port``,
    ``command`` by name (``CONNECT``, ``UDP``...)."""
    for key in ("target", "resolved"):
        if fields.get(key) is not None:
            fields[key] = address_from_text(fields[key])
    if fields.get("command") is not None:
        fields["command"] = COMMANDS_BY_NAME[fields["command"]]
    return Session(session_id, Address.of(*_split(client)), **fields)


def _split(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.removeprefix("[").removesuffix("]"), int(port)
