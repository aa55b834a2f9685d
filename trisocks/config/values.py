"""The value types a config is made of, and the error every bad value raises.

:class:`Endpoint` is a listener or the admin address; :class:`ConfigError` names the key at
fault, and its message is what ``trisocks serve`` and ``trisocks check`` print.
"""

from __future__ import annotations

import ipaddress

import attrs

__all__ = ["ConfigError", "Endpoint", "IPNetwork"]


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class ConfigError(Exception):
    """A configuration value is wrong; the message names the key."""


@attrs.frozen
class Endpoint:
    """A host and port to listen on or to bind."""

    host: str
    port: int
    tls: bool = False
    """A TLS listener (``tls://HOST:PORT`` in ``listen``): every protocol inside TLS."""

    @classmethod
    def parse(cls, text: str, *, key: str = "listen") -> Endpoint:
        """Parse ``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces is never implied:
        an empty host means 127.0.0.1); in ``listen``, ``tls://`` in front makes a TLS
        listener."""
        tls = key == "listen" and text.startswith("tls://")
        if tls:
            text = text.removeprefix("tls://")
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ConfigError(f"{key}: {text!r} is not HOST:PORT")
        if host.startswith("["):
            if not host.endswith("]"):
                raise ConfigError(f"{key}: {text!r} has an unclosed '['")
            host = host[1:-1]
        elif ":" in host:
            raise ConfigError(f"{key}: write IPv6 addresses in brackets, as [::1]:1080")
        try:
            port = int(port_text)
        except ValueError:
            raise ConfigError(f"{key}: port {port_text!r} is not a number") from None
        if not 0 <= port <= 65535:
            raise ConfigError(f"{key}: port {port} is out of range 0..65535")
        return cls(host or "127.0.0.1", port, tls)

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        address = f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
        return f"tls://{address}" if self.tls else address
