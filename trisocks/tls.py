"""TLS listeners (``listen = ["tls://HOST:PORT"]``): the server's SSL context and the identity
a client certificate carries.

Rules:

1. The context is built from ``tls_cert``/``tls_key`` (and ``tls_client_ca``) when the config
   is checked, when the server starts and on every reload; a file that does not load is a
   :class:`~trisocks.config.ConfigError` naming the key (a reload keeps the running context).
2. A handshake uses the context current when it starts: live sessions keep theirs.
3. With ``tls_client_ca`` a client must present a certificate that CA verifies; its subject's
   common name (CN) is the session's user, and no password is asked.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from trisocks.config import ConfigError

if TYPE_CHECKING:
    from trisocks.config import Config

__all__ = ["certificate_user", "server_context"]


def server_context(config: Config) -> ssl.SSLContext | None:
    """The server-side context for *config*'s TLS listeners; ``None`` without ``tls_cert``.

    Raises:
        ConfigError: a file is missing or not a valid PEM certificate, key or CA bundle (or
            the key does not match the certificate).
    """
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key)
    except OSError as exc:
        raise ConfigError(
            f"tls_cert: cannot load {config.tls_cert} with key {config.tls_key}: "
            f"{exc.strerror or exc}"
        ) from None
    except ssl.SSLError as exc:
        raise ConfigError(
            f"tls_cert: {config.tls_cert} with key {config.tls_key} is not a valid PEM "
            f"certificate and matching key: {exc.reason or exc}"
        ) from None
    if config.tls_client_ca is not None:
        try:
            context.load_verify_locations(cafile=config.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ConfigError(
                f"tls_client_ca: cannot load {config.tls_client_ca} as PEM CA certificates: "
                f"{reason}"
            ) from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def certificate_user(peercert: dict[str, Any] | None) -> str | None:
    """The user a verified client certificate names: its subject's CN (the last one, the
    most specific, if there are several); ``None`` when there is no certificate or no CN."""
    if not peercert:
        return None
    names = [value for rdn in peercert.get("subject", ()) for key, value in rdn
             if key == "commonName"]
    return names[-1] if names else None
