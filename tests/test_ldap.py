"""The ``ldap`` password backend (:mod:`trisocks.identity.ldap`): its escaping and group names
as units, then against a real OpenLDAP ``slapd`` the tests start (:mod:`tests.ldap_support`):
direct bind, search-then-bind, refusals, names with LDAP-special characters, a directory that
stops and comes back, one that never answers; then end to end through the proxy with curl and
python-socks, the admin API, a rule on an LDAP group, and revocation at the directory.

Outside CI these tests skip when ``slapd`` or ``ldap-utils`` are missing, with the reason in
the summary (``-ra``); with ``CI`` set they fail instead.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests import ldap_support
from tests.admin_support import ADMIN, TOKEN, admin_url, echo_round
from tests.conftest import (
    HttpOrigin,
    Proxy,
    connect_request,
    eventually,
    open_connect,
    read_reply,
    receive_exactly,
    run_curl,
)
from tests.ldap_support import PEOPLE, SERVICE_DN, SERVICE_PASSWORD, USER_DN_TEMPLATE, USERS
from trisocks.config import Config
from trisocks.identity.ldap import LdapBackend, escape_dn_value, escape_filter_value, group_name
from trisocks.identity.model import BackendError, Identity, LoginRequest
from trisocks.policy.rule_parsing import parse_rules

StartProxy = Callable[..., Any]
Echo = tuple[str, int]

ALICE_PASSWORD = USERS["alice"][0]
BOB_PASSWORD = USERS["bob"][0]
HOSTILE_NAMES = ("*", "alice*", "*)(uid=*", "alice)(uid=*", "*)(|(uid=*", "alice,ou=people",
                 "uid=alice", "alice\\", "alice\x00", "#alice", "alice+cn=alice")
"""Names that must not match anyone: filter and DN metacharacters around a real uid."""


# -- units: escaping and group names ----------------------------------------------------------

@pytest.mark.parametrize(("value", "escaped"), [
    ("alice", "alice"),
    ("a,b", "a\\,b"),
    ('q"+;<>=\\', 'q\\"\\+\\;\\<\\>\\=\\\\'),
    ("#x", "\\#x"),
    (" a b ", "\\ a b\\ "),
    ("x#y", "x#y"),
    ("x\x00y", "x\\00y"),
    ("café", "café"),
    ("*)(", "*)("),  # not special in a DN: the value is matched literally
])
def test_dn_values_are_escaped_per_rfc4514(value: str, escaped: str) -> None:
    assert escape_dn_value(value) == escaped


@pytest.mark.parametrize("value", ["a,b", ' q"+;<>=\\ ', "#x", "café", "R&D, Inc.", "x\x00y"])
def test_an_escaped_value_reads_back_as_itself(value: str) -> None:
    assert group_name(f"cn={escape_dn_value(value)},ou=groups,dc=example,dc=org") == value


@pytest.mark.parametrize(("value", "escaped"), [
    ("alice", "alice"),
    ("*", "\\2a"),
    ("a)(uid=*", "a\\29\\28uid=\\2a"),
    ("back\\slash", "back\\5cslash"),
    ("nul\x00", "nul\\00"),
    ("a,b=c", "a,b=c"),  # not special in a filter
])
def test_filter_values_are_escaped_per_rfc4515(value: str, escaped: str) -> None:
    assert escape_filter_value(value) == escaped


@pytest.mark.parametrize(("value", "name"), [
    ("cn=staff,ou=groups,dc=example,dc=org", "staff"),
    ("CN=Domain Users,CN=Users,DC=corp,DC=example", "Domain Users"),
    ("cn=R\\2CD,ou=groups", "R,D"),
    ("cn=caf\\C3\\A9,ou=groups", "café"),
    ("cn=a\\+b+ou=x,dc=example", "a+b"),  # a multi-valued RDN: its first value
    ("staff", "staff"),  # not a DN: the value is the name
])
def test_group_name_is_the_first_rdn_value(value: str, name: str) -> None:
    assert group_name(value) == name


# -- the directory ----------------------------------------------------------------------------

@pytest.fixture
def directory(tmp_path: Path) -> Iterator[ldap_support.Directory]:
    reason = ldap_support.missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"LDAP tests must run in CI: {reason}")
        pytest.skip(reason)
    ldir = ldap_support.start_directory(tmp_path / "slapd")
    try:
        yield ldir
    finally:
        ldir.stop()


def ldap_keys(directory: ldap_support.Directory, tmp_path: Path, mode: str, **overrides: Any
              ) -> dict[str, Any]:
    """Config keys of the ldap backend: *mode* ``direct``, ``search`` (a service bind DN and
    its password file) or ``anonymous`` (search without binding first)."""
    values: dict[str, Any] = {"password_backends": ("ldap",), "ldap_url": directory.url,
                              "ldap_timeout": 2.0}
    if mode == "direct":
        values["ldap_user_dn"] = USER_DN_TEMPLATE
    else:
        values["ldap_search_base"] = PEOPLE
        if mode == "search":
            secret = tmp_path / "ldap.secret"
            secret.write_text(SERVICE_PASSWORD + "\n")
            values.update(ldap_bind_dn=SERVICE_DN, ldap_bind_password_file=secret)
    values.update(overrides)
    return values


def backend(directory: ldap_support.Directory, tmp_path: Path, mode: str, **overrides: Any
            ) -> LdapBackend:
    return LdapBackend(Config(**ldap_keys(directory, tmp_path, mode, **overrides)))


def request(user: str | bytes, password: str | bytes) -> LoginRequest:
    return LoginRequest(user.encode() if isinstance(user, str) else user,
                        password.encode() if isinstance(password, str) else password,
                        client="192.0.2.7", listener="127.0.0.1:1080")


MODES = pytest.mark.parametrize("mode", ["direct", "search", "anonymous"])


@MODES
async def test_a_login_gives_the_directory_spelling_and_groups(
    directory: ldap_support.Directory, tmp_path: Path, mode: str
) -> None:
    b = backend(directory, tmp_path, mode)
    with trio.fail_after(20):
        assert await b.login(request("alice", ALICE_PASSWORD)) == Identity(
            "ldap", "alice", frozenset({"staff"}))
        assert await b.login(request("ALICE", ALICE_PASSWORD)) == Identity(
            "ldap", "alice", frozenset({"staff"}))
        # The directory matches uid ignoring case and surrounding spaces: one account.
        assert await b.login(request(" Alice ", ALICE_PASSWORD)) == Identity(
            "ldap", "alice", frozenset({"staff"}))
        assert await b.login(request("dan,jr", USERS["dan,jr"][0])) == Identity(
            "ldap", "dan,jr", frozenset({"staff", "guests"}))
    await b.aclose()


@MODES
async def test_wrong_unknown_and_empty_are_refused(
    directory: ldap_support.Directory, tmp_path: Path, mode: str
) -> None:
    b = backend(directory, tmp_path, mode)
    with trio.fail_after(20):
        assert await b.login(request("alice", "wrong")) is None
        assert await b.login(request("alice", BOB_PASSWORD)) is None
        assert await b.login(request("nobody", ALICE_PASSWORD)) is None
        assert await b.login(request(b"\xffalice", ALICE_PASSWORD)) is None  # not UTF-8
        assert await b.login(request("", "")) is None
        # An empty password would be an unauthenticated bind, which slapd answers with
        # success: it is refused before the directory is asked (even when it is down).
        assert await b.login(request("alice", "")) is None
        await trio.to_thread.run_sync(directory.stop)
        assert await b.login(request("alice", "")) is None


@MODES
async def test_names_with_ldap_special_characters_match_no_one(
    directory: ldap_support.Directory, tmp_path: Path, mode: str
) -> None:
    b = backend(directory, tmp_path, mode)
    with trio.fail_after(30):
        for name in HOSTILE_NAMES:
            for password in (ALICE_PASSWORD, USERS["twin1"][0]):
                assert await b.login(request(name, password)) is None, (name, password)


async def test_a_search_that_matches_two_entries_is_refused_and_logged(
    directory: ldap_support.Directory, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    b = backend(directory, tmp_path, "search", ldap_search_filter="(sn={user})")
    with trio.fail_after(20):
        assert await b.login(request("Alice", ALICE_PASSWORD)) == Identity(
            "ldap", "Alice", frozenset({"staff"}))  # sn is the matched attribute: its spelling
        assert await b.login(request("Twin", USERS["twin1"][0])) is None
    assert "matches more than one entry" in caplog.text
    assert USERS["twin1"][0] not in caplog.text


async def test_a_wrong_service_password_is_a_backend_error(
    directory: ldap_support.Directory, tmp_path: Path
) -> None:
    b = backend(directory, tmp_path, "search")
    assert b.bind_dn == SERVICE_DN
    wrong = tmp_path / "wrong.secret"
    wrong.write_text("not-the-service-password\n")
    b = backend(directory, tmp_path, "search", ldap_bind_password_file=wrong)
    with trio.fail_after(20), pytest.raises(BackendError, match="service bind") as caught:
        await b.login(request("alice", ALICE_PASSWORD))
    assert "not-the-service-password" not in str(caught.value)
    assert ALICE_PASSWORD not in str(caught.value)


async def test_starttls_to_a_directory_without_tls_fails_closed(
    directory: ldap_support.Directory, tmp_path: Path
) -> None:
    b = backend(directory, tmp_path, "direct", ldap_starttls=True)
    with trio.fail_after(20), pytest.raises(BackendError, match="StartTLS"):
        await b.login(request("alice", ALICE_PASSWORD))


@pytest.fixture
def tls_directory(tmp_path: Path) -> Iterator[tuple[ldap_support.Directory, Path]]:
    """A directory with a certificate for 127.0.0.1 (StartTLS and ldaps://), and its CA."""
    import trustme

    reason = ldap_support.missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"LDAP tests must run in CI: {reason}")
        pytest.skip(reason)
    ca = trustme.CA()
    leaf = ca.issue_cert("127.0.0.1")
    ca_file, cert, key = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ldir = ldap_support.start_directory(tmp_path / "slapd", (ca_file, cert, key))
    try:
        yield ldir, ca_file
    finally:
        ldir.stop()


async def test_starttls_and_ldaps_verify_the_directory_certificate(
    tls_directory: tuple[ldap_support.Directory, Path], tmp_path: Path
) -> None:
    import trustme

    directory, ca_file = tls_directory
    other = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other))
    alice = Identity("ldap", "alice", frozenset({"staff"}))
    with trio.fail_after(30):
        for mode in ("direct", "search"):
            starttls = backend(directory, tmp_path, mode, ldap_starttls=True, ldap_ca_file=ca_file)
            assert await starttls.login(request("alice", ALICE_PASSWORD)) == alice
            ldaps = backend(directory, tmp_path, mode, ldap_url=directory.ldaps_url,
                            ldap_ca_file=ca_file)
            assert await ldaps.login(request("alice", ALICE_PASSWORD)) == alice
            assert await ldaps.login(request("alice", "wrong")) is None
            for overrides in ({"ldap_starttls": True}, {"ldap_url": directory.ldaps_url}):
                untrusted = backend(directory, tmp_path, mode, ldap_ca_file=other, **overrides)
                with pytest.raises(BackendError, match=r"(?i)certificate verify failed"):
                    await untrusted.login(request("alice", ALICE_PASSWORD))


@MODES
async def test_a_stopped_directory_is_a_backend_error_then_recovers(
    directory: ldap_support.Directory, tmp_path: Path, mode: str
) -> None:
    b = backend(directory, tmp_path, mode)
    with trio.fail_after(30):
        assert await b.login(request("alice", ALICE_PASSWORD)) is not None
        await trio.to_thread.run_sync(directory.stop)
        with pytest.raises(BackendError, match=r"127\.0\.0\.1") as caught:
            await b.login(request("alice", ALICE_PASSWORD))
        assert ALICE_PASSWORD not in str(caught.value)
        await trio.to_thread.run_sync(directory.start)
        assert await b.login(request("alice", ALICE_PASSWORD)) is not None


async def test_a_directory_that_never_answers_times_out(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    accepted: list[trio.SocketStream] = []

    async def silent(stream: trio.SocketStream) -> None:
        accepted.append(stream)
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, silent, 0,
                                                      host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    b = LdapBackend(Config(password_backends=("ldap",), ldap_url=f"ldap://127.0.0.1:{port}",
                           ldap_user_dn=USER_DN_TEMPLATE, ldap_timeout=0.5))
    started = trio.current_time()
    with trio.fail_after(10), pytest.raises(BackendError):
        await b.login(request("alice", ALICE_PASSWORD))
    assert 0.4 < trio.current_time() - started < 5
    assert len(accepted) == 1


async def test_revalidate_binds_again(directory: ldap_support.Directory, tmp_path: Path) -> None:
    b = backend(directory, tmp_path, "search")
    with trio.fail_after(20):
        identity = await b.login(request("alice", ALICE_PASSWORD))
        assert identity is not None
        assert await b.revalidate(identity, request("alice", ALICE_PASSWORD)) is True
        await trio.to_thread.run_sync(directory.set_password, "alice", "changed-pass")
        assert await b.revalidate(identity, request("alice", ALICE_PASSWORD)) is False
        await trio.to_thread.run_sync(directory.stop)
        with pytest.raises(BackendError):
            await b.revalidate(identity, request("alice", ALICE_PASSWORD))


async def test_logins_run_side_by_side_up_to_the_pool_size(
    directory: ldap_support.Directory, tmp_path: Path
) -> None:
    b = backend(directory, tmp_path, "search", ldap_pool_size=3)
    results: list[Identity | None] = []

    async def one(i: int) -> None:
        name, password = ("alice", ALICE_PASSWORD) if i % 2 else ("bob", "wrong")
        results.append(await b.login(request(name, password)))

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(12):
                nursery.start_soon(one, i)
    assert results.count(None) == 6
    assert {r.name for r in results if r is not None} == {"alice"}
    assert b._limiter.total_tokens == 3


# -- end to end through the proxy -------------------------------------------------------------

async def ldap_proxy(start_proxy: StartProxy, directory: ldap_support.Directory, tmp_path: Path,
                     mode: str = "search", **overrides: Any) -> Proxy:
    values = ldap_keys(directory, tmp_path, mode, admin=ADMIN, admin_token=TOKEN)
    values.update(overrides)
    proxy: Proxy = await start_proxy(**values)
    return proxy


async def login_status(proxy: Proxy, user: str, password: str) -> bytes:
    """The RFC 1929 reply to *user*/*password* (``01 00`` accepted, ``01 01`` refused)."""
    stream = await trio.open_tcp_stream(*proxy.address)
    async with stream:
        u, p = user.encode(), password.encode()
        await stream.send_all(b"\x05\x01\x02" + bytes([1, len(u)]) + u + bytes([len(p)]) + p)
        assert await receive_exactly(stream, 2) == b"\x05\x02"
        return await receive_exactly(stream, 2)


@pytest.mark.parametrize("mode", ["direct", "search"])
async def test_curl_through_the_proxy_with_an_ldap_login(
    start_proxy: StartProxy, directory: ldap_support.Directory, tmp_path: Path,
    http_origin: HttpOrigin, mode: str
) -> None:
    proxy = await ldap_proxy(start_proxy, directory, tmp_path, mode)
    with trio.fail_after(30):
        result = await run_curl(
            "--fail", "-x", f"socks5h://alice:{ALICE_PASSWORD}@127.0.0.1:{proxy.port}",
            http_origin.url.replace("127.0.0.1", "localhost"))
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == http_origin.body
        wrong = await run_curl("--socks5", f"127.0.0.1:{proxy.port}", "--proxy-user", "alice:wrong",
                               http_origin.url)
        assert wrong.returncode == 97  # CURLE_PROXY: the proxy refused the login
        await eventually(lambda: not len(proxy.ctx.registry))
    usage = {u["user"]: u for u in proxy.ctx.accountant.live_usage()}
    assert usage["ldap:alice"]["bytes_down"] > len(http_origin.body)
    assert "alice" not in usage or usage["alice"]["sessions_total"] == 0  # the store's alice
    assert proxy.ctx.logins.counts.accepted["ldap"] == 1
    assert proxy.ctx.logins.counts.refused["ldap"] == 1


async def test_python_socks_session_is_the_ldap_identity(
    start_proxy: StartProxy, directory: ldap_support.Directory, tmp_path: Path, echo_server: Echo
) -> None:
    from python_socks.async_.trio import Proxy as SocksProxy

    proxy = await ldap_proxy(start_proxy, directory, tmp_path)
    socks = SocksProxy.from_url(f"socks5://ALICE:{ALICE_PASSWORD}@127.0.0.1:{proxy.port}")
    with trio.fail_after(20):
        stream = trio.SocketStream(await socks.connect(*echo_server))
        async with stream:
            await echo_round(stream, b"p" * 4096)
            (session,) = list(proxy.ctx.registry)
            assert session.user == "ldap:alice"  # the directory's spelling
            assert session.groups == frozenset({"staff"})


async def test_api_lists_the_ldap_identity_with_its_source_and_exact_bytes(
    start_proxy: StartProxy, directory: ldap_support.Directory, tmp_path: Path, echo_server: Echo
) -> None:
    proxy = await ldap_proxy(start_proxy, directory, tmp_path)
    async with httpx.AsyncClient(base_url=admin_url(proxy),
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        with trio.fail_after(20):
            stream = await open_connect(proxy, echo_server, "alice", ALICE_PASSWORD)
            async with stream:
                await echo_round(stream, b"u" * 1234)
            await eventually(lambda: not len(proxy.ctx.registry))
            users = (await api.get("/api/users")).json()["users"]
    (row,) = [u for u in users if u["user"] == "ldap:alice"]
    assert row["source"] == "ldap"
    assert (row["bytes_up"], row["bytes_down"]) == (1234, 1234)


async def test_a_rule_on_an_ldap_group(
    start_proxy: StartProxy, directory: ldap_support.Directory, tmp_path: Path, echo_server: Echo
) -> None:
    rules = parse_rules([{"id": "no-guests", "action": "deny", "users": ["@guests"]}])
    proxy = await ldap_proxy(start_proxy, directory, tmp_path, rules=rules)
    with trio.fail_after(20):
        stream = await open_connect(proxy, echo_server, "alice", ALICE_PASSWORD)  # staff
        async with stream:
            await echo_round(stream, b"ok")
        for user, password in (("bob", BOB_PASSWORD), ("dan,jr", USERS["dan,jr"][0])):
            stream = await trio.open_tcp_stream(*proxy.address)
            async with stream:
                u, p = user.encode(), password.encode()
                await stream.send_all(
                    b"\x05\x01\x02" + bytes([1, len(u)]) + u + bytes([len(p)]) + p)
                assert await receive_exactly(stream, 4) == b"\x05\x02\x01\x00"
                await stream.send_all(connect_request(*echo_server))
                rep, _, _ = await read_reply(stream)
            assert rep == 2, user  # connection not allowed by ruleset
    assert proxy.ctx.stats.denied["no-guests"] == 2


async def test_a_directory_stopped_mid_run_fails_closed_then_recovers(
    start_proxy: StartProxy, directory: ldap_support.Directory, tmp_path: Path, echo_server: Echo
) -> None:
    proxy = await ldap_proxy(start_proxy, directory, tmp_path)
    with trio.fail_after(30):
        live = await open_connect(proxy, echo_server, "alice", ALICE_PASSWORD)
        async with live:
            await trio.to_thread.run_sync(directory.stop)
            assert await login_status(proxy, "bob", BOB_PASSWORD) == b"\x01\x01"
            assert proxy.ctx.logins.counts.errors["ldap"] == 1
            await echo_round(live, b"still relaying")  # a live session is not ended for it
            await trio.to_thread.run_sync(directory.start)
            assert await login_status(proxy, "bob", BOB_PASSWORD) == b"\x01\x00"
            stream = await open_connect(proxy, echo_server, "bob", BOB_PASSWORD)
            async with stream:
                await echo_round(stream, b"back")
    assert proxy.ctx.logins.counts.errors["ldap"] == 1


async def test_revocation_at_the_directory_ends_the_live_session(
    start_proxy: StartProxy, directory: ldap_support.Directory, tmp_path: Path,
    echo_server: Echo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trisocks.access")
    proxy = await ldap_proxy(start_proxy, directory, tmp_path, auth_revalidate_interval=0.5)
    with trio.fail_after(30):
        stream = await open_connect(proxy, echo_server, "alice", ALICE_PASSWORD)
        async with stream:
            await echo_round(stream, b"before")
            await trio.sleep(1.2)  # revalidated a few times: still valid
            await echo_round(stream, b"still")
            await trio.to_thread.run_sync(directory.set_password, "alice", "changed-pass")
            with trio.fail_after(10):
                assert await stream.receive_some(100) == b""  # the proxy closed it
        await eventually(lambda: any(r.name == "trisocks.access" for r in caplog.records), 5)
        assert await login_status(proxy, "alice", ALICE_PASSWORD) == b"\x01\x01"
        assert await login_status(proxy, "alice", "changed-pass") == b"\x01\x00"
    lines = [r.getMessage() for r in caplog.records if r.name == "trisocks.access"]
    assert any("ldap:alice" in line and "revoked by ldap" in line for line in lines), lines
