"""A throwaway OpenLDAP directory for the LDAP backend tests (no tests here).

:func:`start_directory` writes a ``slapd.conf`` into a directory (the Debian schemas from
/etc/ldap/schema, an ``mdb`` database in that directory, the ``memberof`` overlay so group
membership shows as ``memberOf`` on the users), starts ``slapd -d 0`` on a free loopback port
as a child process, waits until it answers, then loads :data:`LDIF` with ``ldapadd`` as the
root DN. :meth:`Directory.stop` and :meth:`Directory.start` stop the server and start it again
on the same port with the same data (the "directory down mid-run" tests).

Nothing here needs root or touches /etc. Outside CI the tests skip when the Debian packages
(``slapd``, ``ldap-utils``) are missing; with ``CI`` set they fail instead (:func:`missing`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import attrs

SUFFIX = "dc=example,dc=org"
ROOT_DN, ROOT_PASSWORD = f"cn=admin,{SUFFIX}", "root-pass"
SERVICE_DN, SERVICE_PASSWORD = f"cn=trisocks,ou=services,{SUFFIX}", "service-pass"
PEOPLE = f"ou=people,{SUFFIX}"
USER_DN_TEMPLATE = f"uid={{user}},{PEOPLE}"

USERS = {
    # uid: (password, groups)
    "alice": ("alice-ldap-pass", ("staff",)),
    "bob": ("bob-ldap-pass", ("guests",)),
    "dan,jr": ("dan-ldap-pass", ("staff", "guests")),
    "twin1": ("twin-pass", ()),
    "twin2": ("twin-pass", ()),
}
"""The directory's users; ``twin1`` and ``twin2`` share the surname ``Twin`` (an ambiguous
search), ``dan,jr`` has an RFC 4514 special character in its RDN value."""
GROUPS = ("staff", "guests")
MODULES = Path("/usr/lib/ldap")
SCHEMAS = Path("/etc/ldap/schema")
PROGRAMS = ("slapd", "ldapadd", "ldappasswd")
SBIN = ("/usr/sbin", "/usr/local/sbin")


def _which(program: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return shutil.which(program, path=path)


def missing() -> str | None:
    """Why the directory cannot be started here (``None``: it can)."""
    absent = [p for p in PROGRAMS if _which(p) is None]
    if absent:
        return f"OpenLDAP programs missing: {', '.join(absent)} (apt-get install slapd ldap-utils)"
    for needed in (MODULES / "memberof.la", MODULES / "back_mdb.la", SCHEMAS / "nis.schema"):
        if not needed.exists():
            return f"{needed} is missing (apt-get install slapd)"
    return None


def user_dn(uid: str) -> str:
    escaped = uid.replace("\\", "\\\\").replace(",", "\\,")
    return f"uid={escaped},{PEOPLE}"


def _ldif() -> str:
    parts = [f"""\
dn: {SUFFIX}
objectClass: dcObject
objectClass: organization
dc: example
o: Example

dn: {PEOPLE}
objectClass: organizationalUnit
ou: people

dn: ou=groups,{SUFFIX}
objectClass: organizationalUnit
ou: groups

dn: ou=services,{SUFFIX}
objectClass: organizationalUnit
ou: services

dn: {SERVICE_DN}
objectClass: organizationalRole
objectClass: simpleSecurityObject
cn: trisocks
userPassword: {SERVICE_PASSWORD}
"""]
    for uid, (password, _) in USERS.items():
        surname = "Twin" if uid.startswith("twin") else uid.title()
        parts.append(f"""\
dn: {user_dn(uid)}
objectClass: inetOrgPerson
uid: {uid}
cn: {uid}
sn: {surname}
userPassword: {password}
""")
    for group in GROUPS:
        members = [f"member: {user_dn(uid)}" for uid, (_, groups) in USERS.items()
                   if group in groups]
        parts.append(f"dn: cn={group},ou=groups,{SUFFIX}\nobjectClass: groupOfNames\n"
                     f"cn: {group}\n" + "\n".join(members) + "\n")
    return "\n".join(parts)


def _config(d: Path, tls: tuple[Path, Path, Path] | None) -> str:
    ca, cert, key = tls if tls is not None else (None, None, None)
    tls_lines = (f"TLSCACertificateFile {ca}\nTLSCertificateFile {cert}\n"
                 f"TLSCertificateKeyFile {key}\n") if tls is not None else ""
    return f"""\
{tls_lines}include {SCHEMAS}/core.schema
include {SCHEMAS}/cosine.schema
include {SCHEMAS}/inetorgperson.schema
include {SCHEMAS}/nis.schema
modulepath {MODULES}
moduleload back_mdb
moduleload memberof
pidfile {d}/slapd.pid
argsfile {d}/slapd.args

database mdb
maxsize 16777216
suffix "{SUFFIX}"
rootdn "{ROOT_DN}"
rootpw {ROOT_PASSWORD}
directory {d}/db

overlay memberof
memberof-group-oc groupOfNames
memberof-member-ad member
memberof-memberof-ad memberOf
memberof-refint TRUE

access to attrs=userPassword
    by self write
    by anonymous auth
    by * none
access to *
    by * read
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@attrs.define
class Directory:
    """A running slapd; :meth:`stop` kills it, :meth:`start` runs it again (same port, data)."""

    directory: Path
    port: int
    tls_port: int | None = None
    """The ``ldaps://`` port, when started with TLS files."""
    slapd: subprocess.Popen[bytes] | None = None
    setup_seconds: float = 0.0

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        assert self.tls_port is not None
        return f"ldaps://127.0.0.1:{self.tls_port}"

    def start(self) -> None:
        """Start slapd and wait (at most 10 s) until it accepts connections."""
        log = (self.directory / "slapd.log").open("ab")
        urls = f"{self.url}/" + (f" {self.ldaps_url}/" if self.tls_port is not None else "")
        try:
            self.slapd = subprocess.Popen(
                [_which("slapd") or "slapd", "-d", "0", "-h", urls,
                 "-f", str(self.directory / "slapd.conf")],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        deadline = time.monotonic() + 10
        while True:
            if self.slapd.poll() is not None:
                raise RuntimeError(f"slapd exited {self.slapd.returncode}: "
                                   f"{(self.directory / 'slapd.log').read_text()}")
            try:
                for port in (self.port, self.tls_port):
                    if port is not None:
                        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("slapd did not start listening") from None
                time.sleep(0.01)

    def stop(self) -> None:
        """Kill slapd and wait for it (the port is closed when this returns)."""
        if self.slapd is None:
            return
        if self.slapd.poll() is None:
            self.slapd.kill()
        self.slapd.wait(timeout=10)
        self.slapd = None

    def ldap(self, program: str, *argv: str, stdin: str = "") -> None:
        """Run an ldap-utils *program* as the root DN; RuntimeError with its output if it
        fails."""
        result = subprocess.run(
            [_which(program) or program, "-x", "-H", self.url, "-D", ROOT_DN,
             "-w", ROOT_PASSWORD, *argv],
            input=stdin, capture_output=True, text=True, timeout=20)
        if result.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(argv)}: {result.stdout}{result.stderr}")

    def set_password(self, uid: str, password: str) -> None:
        """Change *uid*'s password in the directory (``ldappasswd``, as the root DN)."""
        self.ldap("ldappasswd", "-s", password, user_dn(uid))


def start_directory(directory: Path, tls: tuple[Path, Path, Path] | None = None) -> Directory:
    """Configure, start and fill a directory in *directory* (see the module docstring).
    With *tls* (CA, certificate and key PEM files) it offers StartTLS and also listens for
    ``ldaps://`` on :attr:`Directory.tls_port`."""
    started = time.monotonic()
    (directory / "db").mkdir(parents=True)
    (directory / "slapd.conf").write_text(_config(directory, tls))
    ldir = Directory(directory, _free_port(), _free_port() if tls is not None else None)
    ldir.start()
    try:
        ldir.ldap("ldapadd", stdin=_ldif())
    except BaseException:
        ldir.stop()
        raise
    ldir.setup_seconds = time.monotonic() - started
    return ldir
