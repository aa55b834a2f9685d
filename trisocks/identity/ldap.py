"""The ``ldap`` password backend: RFC 1929 logins checked by binding to an LDAP directory.

Two ways to find the user's entry (``trisocks check`` requires exactly one):

- *Direct bind*: ``ldap_user_dn`` is a template such as ``uid={user},ou=people,dc=example,dc=org``;
  ``{user}`` is replaced by the name escaped as an RFC 4514 attribute value, and the backend
  binds as that DN with the password.
- *Search, then bind*: the backend binds as ``ldap_bind_dn`` (password from
  ``ldap_bind_password_file``) or anonymously, searches ``ldap_search_base`` with
  ``ldap_search_filter`` (``{user}`` replaced by the name escaped per RFC 4515), and binds as
  the one entry found. No entry refuses the login; more than one refuses it too, and is logged
  (the filter is ambiguous, and guessing could let one user stand for another).

An empty password is refused without asking the directory: an LDAP simple bind with a DN and no
password is an *unauthenticated* bind (RFC 4513 5.1.2), which many servers answer with success.
A name that is not UTF-8 is refused too (LDAP strings are UTF-8).

The identity's groups are the values of the entry's ``ldap_group_attribute`` (``memberOf`` by
default); each is a group DN whose first RDN value is the group's name
(``cn=staff,ou=groups,dc=example,dc=org`` is ``staff``, ``@staff`` in rules). A value that is
not a DN is taken as the name itself. The identity's name is the one typed, in the directory's
spelling when the entry has the attribute the template or filter matches on (``uid``).

The directory is reached with ldap3, in threads (``trio.to_thread``), at most
``ldap_pool_size`` operations at once; each operation opens its own connection (TLS with
``ldaps://`` or ``ldap_starttls``, the certificate verified against ``ldap_ca_file`` or the
system's CAs) and closes it. Connecting and every reply are bounded by ``ldap_timeout``.
Wrong credentials and unknown users refuse the login (``None``); a server that is down or
slow, TLS failures and other LDAP errors raise :class:`BackendError` (the login fails closed).
"""

from __future__ import annotations

import logging
import re
import ssl
import warnings
from typing import Any

import trio

with warnings.catch_warnings():
    # ldap3 2.9 imports names pyasn1 0.6 deprecated (tagMap, typeMap); harmless, but warned
    # about on every start.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"pyasn1\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ldap3\.")
    import ldap3
    from ldap3.core import exceptions as ldap_errors
    from ldap3.utils.conv import escape_filter_chars
    from ldap3.utils.dn import parse_dn

from trisocks.config import Config
from trisocks.identity.model import BackendError, Identity, LoginRequest

__all__ = ["LdapBackend", "escape_dn_value", "escape_filter_value", "group_name"]

log = logging.getLogger("trisocks.auth")

INVALID_CREDENTIALS = 49
NO_SUCH_OBJECT = 32
SIZE_LIMIT_EXCEEDED = 4
_REFUSED = frozenset({INVALID_CREDENTIALS, NO_SUCH_OBJECT})
"""Bind results that mean wrong credentials or no such user (not a backend error)."""

_DN_SPECIAL = frozenset('"+,;<>\\=')
_MATCHED = re.compile(r"\(\s*([A-Za-z][A-Za-z0-9-]*)\s*=\s*\{user\}\s*\)")
_TEMPLATE_RDN = re.compile(r"^\s*([A-Za-z][A-Za-z0-9-]*)\s*=\s*\{user\}")


def escape_dn_value(value: str) -> str:
    """*value* escaped as an RFC 4514 attribute value (for the ``ldap_user_dn`` template):
    the special characters backslash-escaped, a leading ``#`` or space and a trailing space
    escaped, NUL as ``\\00``."""
    out = []
    for i, char in enumerate(value):
        if char == "\0":
            out.append("\\00")
        elif char in _DN_SPECIAL or (i == 0 and char in "# ") or (
                i == len(value) - 1 and char == " "):
            out.append("\\" + char)
        else:
            out.append(char)
    return "".join(out)


def escape_filter_value(value: str) -> str:
    """*value* escaped for an RFC 4515 filter (``*``, ``(``, ``)``, ``\\`` and NUL as
    ``\\XX``)."""
    return str(escape_filter_chars(value))


def _unescape_dn_value(value: str) -> str:
    """An RFC 4514 attribute value with its escapes (``\\c``, ``\\XX`` UTF-8 bytes) undone."""
    if "\\" not in value:
        return value
    out = bytearray()
    i = 0
    while i < len(value):
        char = value[i]
        if char == "\\" and i + 1 < len(value):
            pair = value[i + 1:i + 3]
            if len(pair) == 2 and all(c in "0123456789abcdefABCDEF" for c in pair):
                out.append(int(pair, 16))
                i += 3
                continue
            out += value[i + 1].encode()
            i += 2
            continue
        out += char.encode()
        i += 1
    return out.decode("utf-8", "replace")


def group_name(value: str) -> str:
    """The group named by a ``ldap_group_attribute`` value: a DN's first RDN value
    (``cn=staff,ou=groups,dc=example,dc=org`` -> ``staff``), or *value* itself when it is not
    a DN."""
    try:
        rdns = parse_dn(value)
    except (ldap_errors.LDAPException, ValueError, IndexError):
        return value.strip()
    if not rdns:
        return value.strip()
    return _unescape_dn_value(rdns[0][1])


def _refused(result: dict[str, Any]) -> bool:
    return result.get("result") in _REFUSED


def _describe(result: dict[str, Any]) -> str:
    text = f"{result.get('description', 'error')} ({result.get('result')})"
    message = result.get("message") or ""
    return f"{text}: {message}" if message else text


class _Tls(ldap3.Tls):  # type: ignore[misc]
    """ldap3's TLS settings, with the handshake and the certificate's name checked by the
    standard library (a context with ``check_hostname``, ``CERT_REQUIRED``, the CA file or
    the system's CAs): ldap3's own name check calls ``ssl.match_hostname``, deprecated and
    gone in Python 3.12."""

    def __init__(self, ca_file: str | None) -> None:
        super().__init__(validate=ssl.CERT_REQUIRED, ca_certs_file=ca_file)
        self._context = ssl.create_default_context(cafile=ca_file)

    def wrap_socket(self, connection: Any, do_handshake: bool = False) -> None:
        connection.socket = self._context.wrap_socket(
            connection.socket, server_hostname=connection.server.host,
            do_handshake_on_connect=do_handshake)


class LdapBackend:
    """Checks logins against the directory of *config*'s ``ldap_*`` keys (module docstring)."""

    source = "ldap"

    def __init__(self, config: Config) -> None:
        if config.ldap_url is None:
            raise ValueError("the ldap backend needs ldap_url")
        self.url = config.ldap_url
        self.timeout = config.ldap_timeout
        self.starttls = config.ldap_starttls
        self.user_dn = config.ldap_user_dn
        self.search_base = config.ldap_search_base
        self.search_filter = config.ldap_search_filter
        self.bind_dn = config.ldap_bind_dn
        self.group_attribute = config.ldap_group_attribute
        self._bind_password: str | None = None
        if config.ldap_bind_password_file is not None:
            text = config.ldap_bind_password_file.read_text(encoding="utf-8")
            self._bind_password = text.splitlines()[0] if text else ""
        pattern = _TEMPLATE_RDN if self.user_dn is not None else _MATCHED
        found = pattern.search(self.user_dn if self.user_dn is not None else self.search_filter)
        self.name_attribute = found.group(1) if found else None
        """The attribute whose value is the typed name (``uid``): the entry's spelling wins."""
        self._tls = None
        if self.url.lower().startswith("ldaps://") or self.starttls:
            ca = str(config.ldap_ca_file) if config.ldap_ca_file is not None else None
            self._tls = _Tls(ca)
        self._limiter = trio.CapacityLimiter(config.ldap_pool_size)

    async def login(self, request: LoginRequest) -> Identity | None:
        try:
            name = request.user.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if not name or not request.password:
            return None
        try:
            password = request.password.decode("utf-8")
        except UnicodeDecodeError:
            # LDAP passwords are octet strings; ldap3 sends bytes as they are.
            password = request.password  # type: ignore[assignment]
        return await trio.to_thread.run_sync(
            self._check, name, password, limiter=self._limiter)

    async def revalidate(self, identity: Identity, request: LoginRequest) -> bool:
        return await self.login(request) is not None

    async def aclose(self) -> None:
        """Nothing to release: every operation opens and closes its own connection."""

    # --- in a worker thread -------------------------------------------------------------------

    def _connection(self, user: str | None, password: str | bytes | None) -> ldap3.Connection:
        # A Server per connection: ldap3 remembers addresses that failed and skips them for a
        # while, which would outlast a directory's restart. No receive_timeout: ldap3 packs it
        # as whole seconds; the socket keeps the connect timeout, which bounds every receive
        # (and the TLS handshake) alike.
        server = ldap3.Server(self.url, tls=self._tls, connect_timeout=self.timeout,
                              get_info=ldap3.NONE)
        return ldap3.Connection(
            server, user=user, password=password,
            authentication=ldap3.SIMPLE if user is not None else ldap3.ANONYMOUS,
            auto_referrals=False, raise_exceptions=False, read_only=True)

    def _open(self, conn: ldap3.Connection) -> None:
        conn.open()
        if self.starttls and not conn.start_tls():
            raise BackendError(f"{self.url}: StartTLS refused: {_describe(conn.result)}")

    def _check(self, name: str, password: str | bytes) -> Identity | None:
        try:
            if self.user_dn is not None:
                return self._direct(name, password)
            return self._search(name, password)
        except BackendError:
            raise
        except Exception as exc:  # ldap3 lets socket, ssl and struct errors through, too
            raise BackendError(f"{self.url}: {type(exc).__name__}: {exc}") from None

    def _direct(self, name: str, password: str | bytes) -> Identity | None:
        assert self.user_dn is not None
        dn = self.user_dn.replace("{user}", escape_dn_value(name))
        conn = self._connection(dn, password)
        try:
            self._open(conn)
            if not conn.bind():
                if _refused(conn.result):
                    return None
                raise BackendError(f"{self.url}: bind failed: {_describe(conn.result)}")
            # The user reads its own entry for its groups and spelling; a directory that does
            # not let it is not an error (no groups, the name as typed).
            entry: dict[str, Any] = {}
            if conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=self._attributes()):
                entries = [r for r in conn.response or () if r.get("type") == "searchResEntry"]
                entry = entries[0] if entries else {}
            return self._identity(name, entry)
        finally:
            _close(conn)

    def _search(self, name: str, password: str | bytes) -> Identity | None:
        assert self.search_base is not None
        query = self.search_filter.replace("{user}", escape_filter_value(name))
        conn = self._connection(self.bind_dn, self._bind_password)
        try:
            self._open(conn)
            if not conn.bind():
                raise BackendError(
                    f"{self.url}: service bind as {self.bind_dn or 'anonymous'} failed: "
                    f"{_describe(conn.result)}")
            conn.search(self.search_base, query, ldap3.SUBTREE, attributes=self._attributes(),
                        size_limit=2, time_limit=max(1, int(self.timeout)))
            code = conn.result.get("result")
            if code not in (0, SIZE_LIMIT_EXCEEDED, NO_SUCH_OBJECT):
                raise BackendError(f"{self.url}: search failed: {_describe(conn.result)}")
            entries = [r for r in conn.response or () if r.get("type") == "searchResEntry"]
        finally:
            _close(conn)
        if not entries:
            return None
        if len(entries) > 1:
            log.warning("ldap: the filter %s under %s matches more than one entry; login "
                        "refused", query, self.search_base)
            return None
        entry = entries[0]
        user = self._connection(entry["dn"], password)
        try:
            self._open(user)
            if not user.bind():
                if _refused(user.result):
                    return None
                raise BackendError(f"{self.url}: bind failed: {_describe(user.result)}")
        finally:
            _close(user)
        return self._identity(name, entry)

    def _attributes(self) -> list[str]:
        wanted = [self.group_attribute]
        if self.name_attribute is not None:
            wanted.append(self.name_attribute)
        return wanted

    def _identity(self, name: str, entry: dict[str, Any]) -> Identity:
        raw: dict[str, list[bytes]] = {
            key.lower(): values for key, values in (entry.get("raw_attributes") or {}).items()}
        groups = set()
        for value in raw.get(self.group_attribute.lower(), ()):
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                continue
            group = group_name(text)
            if group:
                groups.add(group)
        spelled = name
        if self.name_attribute is not None:
            values = []
            for value in raw.get(self.name_attribute.lower(), ()):
                try:
                    values.append(value.decode("utf-8"))
                except UnicodeDecodeError:
                    continue
            # The directory matched the entry on this attribute, under its own rules (case
            # and surrounding spaces are insignificant for uid): its value is the name, so
            # " Alice" and "alice" are one account. Of several values, the one that matches.
            same = [v for v in values if _loose(v) == _loose(name)]
            if same:
                spelled = same[0]
            elif len(values) == 1:
                spelled = values[0]
        return Identity(self.source, spelled, frozenset(groups))


def _close(conn: ldap3.Connection) -> None:
    """Unbind *conn* and close its socket: ldap3 leaves the socket of a connection that failed
    to open (refused, timed out) open."""
    try:
        conn.unbind()
    except Exception:  # the connection is being dropped anyway
        pass
    sock = getattr(conn, "socket", None)
    if sock is not None:
        sock.close()


def _loose(name: str) -> str:
    """*name* compared as LDAP's caseIgnoreMatch roughly does: case and runs of spaces
    insignificant."""
    return " ".join(name.split()).casefold()
