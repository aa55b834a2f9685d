"""A throwaway MIT Kerberos realm for the GSSAPI tests.

:func:`start_realm` builds a realm in a directory: ``kdb5_util create``, one ``kadmin.local``
run that adds a user and the ``socks/localhost`` service (plus a keytab for it), then
``krb5kdc -n`` on a free loopback port as a child process, checked alive and answering before
it is returned. Everything lives in that directory: the database, the configs, the credential
cache and the replay cache; :meth:`Realm.environ` gives the variables that point there.

Nothing here needs root or touches /etc. Outside CI the tests skip when the Debian packages
(``krb5-kdc``, ``krb5-admin-server``, ``krb5-user``) or the ``gssapi`` module are missing;
with ``CI`` set they fail instead (:func:`missing`).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import attrs

REALM = "TRISOCKS.TEST"
USER, USER_PASSWORD = "alice", "kerberos-pass"
SERVICE_HOST = "localhost"
PROGRAMS = ("kdb5_util", "kadmin.local", "krb5kdc", "kinit")
SBIN = ("/usr/sbin", "/usr/local/sbin")
KEYTAB = "socks.keytab"


def _which(program: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return shutil.which(program, path=path)


def missing() -> str | None:
    """Why the realm cannot be built here (``None``: it can)."""
    if importlib.util.find_spec("gssapi") is None:
        return "the gssapi module is not installed (pip install 'trisocks[gssapi]')"
    absent = [p for p in PROGRAMS if _which(p) is None]
    if absent:
        return f"MIT Kerberos programs missing: {', '.join(absent)} (apt-get install krb5-kdc " \
               "krb5-admin-server krb5-user)"
    return None


@attrs.define
class Realm:
    """A running realm; :meth:`stop` kills its KDC."""

    directory: Path
    port: int
    kdc: subprocess.Popen[bytes]
    keytab: Path
    setup_seconds: float = 0.0

    def environ(self) -> dict[str, str]:
        return _environ(self.directory)

    def kinit(self, principal: str = USER, password: str = USER_PASSWORD) -> None:
        """Get a TGT into the realm's credential cache."""
        _run(self.directory, "kinit", principal, stdin=password + "\n")

    def stop(self) -> None:
        if self.kdc.poll() is None:
            self.kdc.kill()
        self.kdc.wait(timeout=10)


def _environ(d: Path) -> dict[str, str]:
    return {
        "KRB5_CONFIG": str(d / "krb5.conf"),
        "KRB5_KDC_PROFILE": str(d / "kdc.conf"),
        "KRB5CCNAME": f"FILE:{d / 'ccache'}",
        "KRB5RCACHEDIR": str(d / "rcache"),
        "KRB5_KTNAME": f"FILE:{d / KEYTAB}",
    }


def _run(d: Path, *argv: str, stdin: str = "") -> None:
    """Run a krb5 program against the realm in *d*; RuntimeError with its output if it fails."""
    result = subprocess.run(
        [_which(argv[0]) or argv[0], *argv[1:]], input=stdin, capture_output=True, text=True,
        timeout=20, env={**os.environ, **_environ(d)},
    )
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {result.stdout}{result.stderr}")


def _free_port() -> int:
    """A port free on loopback for both UDP and TCP (the KDC listens on both)."""
    while True:
        with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def _write_configs(d: Path, port: int) -> None:
    # dns_canonicalize_hostname/rdns off: socks@localhost must mean socks/localhost, whatever
    # the resolver thinks. udp_preference_limit 1: always TCP, so a lost datagram can't stall.
    (d / "krb5.conf").write_text(f"""\
[libdefaults]
    default_realm = {REALM}
    dns_lookup_kdc = false
    dns_lookup_realm = false
    dns_canonicalize_hostname = false
    rdns = false
    udp_preference_limit = 1
[realms]
    {REALM} = {{
        kdc = 127.0.0.1:{port}
    }}
""")
    (d / "kdc.conf").write_text(f"""\
[kdcdefaults]
    kdc_listen = 127.0.0.1:{port}
    kdc_tcp_listen = 127.0.0.1:{port}
[realms]
    {REALM} = {{
        database_name = {d / "principal"}
        key_stash_file = {d / "stash"}
        acl_file = {d / "kadm5.acl"}
    }}
[logging]
    kdc = FILE:{d / "kdc.log"}
""")
    (d / "kadm5.acl").write_text("")
    (d / "rcache").mkdir()


def _wait_answering(kdc: subprocess.Popen[bytes], port: int, directory: Path) -> None:
    deadline = time.monotonic() + 10
    while True:
        if kdc.poll() is not None:
            log = directory / "kdc.log"
            raise RuntimeError(f"krb5kdc exited: {log.read_text() if log.exists() else ''}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("krb5kdc did not start listening") from None
            time.sleep(0.005)


def start_realm(directory: Path) -> Realm:
    """Create the realm in *directory* and start its KDC (see the module docstring)."""
    started = time.monotonic()
    port = _free_port()
    _write_configs(directory, port)
    keytab = directory / KEYTAB
    # -W: the master key from the non-blocking random source; a test realm needs no entropy.
    _run(directory, "kdb5_util", "create", "-s", "-W", "-r", REALM, "-P", "master-pass")
    _run(directory, "kadmin.local", stdin="\n".join([
        f"addprinc -pw {USER_PASSWORD} {USER}",
        f"addprinc -randkey socks/{SERVICE_HOST}",
        f"addprinc -randkey other/{SERVICE_HOST}",
        f"ktadd -k {keytab} socks/{SERVICE_HOST}",
        "",
    ]))
    kdc = subprocess.Popen(
        [_which("krb5kdc") or "krb5kdc", "-n", "-r", REALM],
        env={**os.environ, **_environ(directory)},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    realm = Realm(directory, port, kdc, keytab)
    try:
        _wait_answering(kdc, port, directory)
    except BaseException:
        realm.stop()
        raise
    realm.setup_seconds = time.monotonic() - started
    return realm
