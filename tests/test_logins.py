"""The chain of password backends (trisocks.identity.logins) and the identity keys of the config:
order, fail closed, caching, what revalidation remembers; checked with backends written here."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import attrs
import pytest
import trio
import trio.lowlevel
import trio.testing

from tests.test_cli import TRISOCKS
from trisocks.config import ConfigError, build_config
from trisocks.identity.logins import FAILURE_TTL, Logins
from trisocks.identity.model import (
    BackendError,
    Identity,
    LoginRequest,
    account_name,
    parse_account,
)


@attrs.define
class Backend:
    """A password backend with a fixed table, that counts what it is asked."""

    source: str
    users: dict[bytes, bytes] = attrs.field(factory=dict)
    down: bool = False
    asked: int = 0
    groups: frozenset[str] = frozenset()

    async def login(self, request: LoginRequest) -> Identity | None:
        self.asked += 1
        await trio.lowlevel.checkpoint()
        if self.down:
            raise BackendError(f"{self.source} is down")
        if self.users.get(request.user) == request.password:
            return Identity(self.source, request.user.decode(), self.groups)
        return None

    async def revalidate(self, identity: Identity, request: LoginRequest) -> bool:
        return await self.login(request) is not None

    async def aclose(self) -> None:
        pass


def req(user: str, password: str) -> LoginRequest:
    return LoginRequest(user.encode(), password.encode(), client="127.0.0.1", method="socks5")


def test_accounts_are_qualified_except_the_store() -> None:
    assert account_name("store", "alice") == "alice"
    assert account_name("ldap", "alice") == "ldap:alice"
    assert Identity("gssapi", "dave").account == "gssapi:dave"
    assert parse_account("ldap:alice") == ("ldap", "alice")
    assert parse_account("alice") == ("store", "alice")
    assert parse_account("odd:name") == ("store", "odd:name")  # not a source's prefix
    assert parse_account("http:a:b") == ("http", "a:b")


async def test_first_backend_that_accepts_decides() -> None:
    store = Backend("store", {b"alice": b"s1"})
    ldap = Backend("ldap", {b"alice": b"l1", b"bob": b"l2"}, groups=frozenset({"staff"}))
    logins = Logins([store, ldap])
    assert await logins.login(req("alice", "s1")) == Identity("store", "alice")
    assert ldap.asked == 0  # the store answered
    # a password the store refuses goes on to the directory: a different identity
    assert await logins.login(req("alice", "l1")) == Identity("ldap", "alice",
                                                              frozenset({"staff"}))
    assert await logins.login(req("bob", "l2")) == Identity("ldap", "bob", frozenset({"staff"}))
    assert await logins.login(req("bob", "wrong")) is None
    assert logins.counts.accepted == {"store": 1, "ldap": 2}
    assert logins.counts.refused["store"] == 4 - 1 and logins.counts.refused["ldap"] == 1


async def test_a_backend_that_cannot_answer_fails_closed_and_is_logged_once_per_burst(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ldap = Backend("ldap", {b"carol": b"c0rrect-horse"}, down=True)
    hook = Backend("http", {b"carol": b"c0rrect-horse"})
    logins = Logins([ldap, hook])
    with caplog.at_level(logging.WARNING, "trisocks.auth"):
        for _ in range(3):
            assert await logins.login(req("carol", "c0rrect-horse")) is None
    assert hook.asked == 0  # the next backend must not speak for a user ldap may own
    assert logins.counts.errors == {"ldap": 3}
    warnings = [r.getMessage() for r in caplog.records if r.name == "trisocks.auth"]
    assert len(warnings) == 1 and "ldap cannot answer: ldap is down" in warnings[0]
    assert "c0rrect-horse" not in caplog.text  # no password in the log
    ldap.down = False
    assert await logins.login(req("carol", "c0rrect-horse")) == Identity("ldap", "carol")


@pytest.mark.deadline(120)  # of virtual time: the cache's minute passes
async def test_external_logins_are_cached_for_the_ttl_refusals_briefly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ldap = Backend("ldap", {b"dave": b"d"})
    logins = Logins([ldap], cache_ttl=60.0)
    for _ in range(3):
        assert await logins.login(req("dave", "d")) == Identity("ldap", "dave")
    assert ldap.asked == 1
    assert await logins.login(req("dave", "other")) is None  # another password: asked again
    assert await logins.login(req("dave", "other")) is None  # refused: cached briefly
    assert ldap.asked == 2
    await trio.sleep(FAILURE_TTL + 0.1)
    assert await logins.login(req("dave", "other")) is None
    assert ldap.asked == 3
    await trio.sleep(61)
    assert await logins.login(req("dave", "d")) == Identity("ldap", "dave")
    assert ldap.asked == 4  # the success expired


async def test_the_store_is_never_cached_by_the_chain() -> None:
    store = Backend("store", {b"erin": b"e"})
    logins = Logins([store])
    for _ in range(3):
        assert await logins.login(req("erin", "e")) == Identity("store", "erin")
    assert store.asked == 3  # its own cache knows when a password changes


async def test_what_revalidation_remembers_and_forget() -> None:
    ldap = Backend("ldap", {b"frank": b"f"})
    logins = Logins([Backend("store"), ldap])
    await logins.login(req("frank", "f"))
    remembered = logins.remembered()
    assert list(remembered) == ["ldap:frank"]
    identity, request, backend = remembered["ldap:frank"]
    assert identity == Identity("ldap", "frank") and backend is ldap
    assert "password" not in repr(request)  # the credentials never show in a repr
    assert await backend.revalidate(identity, request)
    del ldap.users[b"frank"]
    assert not await backend.revalidate(identity, request)
    logins.forget("ldap:frank")
    assert logins.remembered() == {}
    assert await logins.login(req("frank", "f")) is None  # not answered from the cache


@pytest.mark.parametrize(("values", "message"), [
    ({"password_backends": "store,kerberos"}, "password_backends: unknown backend 'kerberos'"),
    ({"password_backends": "ldap,ldap"}, "password_backends: a backend is listed twice"),
    ({"password_backends": "ldap"}, "password_backends: ldap needs ldap_url"),
    ({"password_backends": "ldap", "ldap_url": "http://x"}, "ldap_url: expected ldap://"),
    ({"password_backends": "ldap", "ldap_url": "ldap://x"}, "ldap_user_dn: give either"),
    ({"password_backends": "ldap", "ldap_url": "ldap://x", "ldap_user_dn": "uid=a",
      "ldap_search_base": "dc=x"}, "ldap_user_dn: give either"),
    ({"password_backends": "ldap", "ldap_url": "ldap://x", "ldap_user_dn": "uid=alice"},
     "ldap_user_dn: the template must contain {user}"),
    ({"password_backends": "ldap", "ldap_url": "ldap://x", "ldap_search_base": "dc=x",
      "ldap_search_filter": "(uid=alice)"}, "ldap_search_filter: the filter must contain"),
    ({"password_backends": "ldap", "ldap_url": "ldap://x", "ldap_search_base": "dc=x",
      "ldap_bind_dn": "cn=svc"}, "ldap_bind_dn: give ldap_bind_dn and ldap_bind_password_file"),
    ({"password_backends": "ldap", "ldap_url": "ldaps://x", "ldap_starttls": True,
      "ldap_user_dn": "uid={user}"}, "ldap_starttls: ldaps:// is TLS already"),
    ({"password_backends": "ldap", "ldap_url": "ldap://x", "ldap_user_dn": "uid={user}",
      "ldap_ca_file": "/nonexistent/ca.pem"}, "ldap_ca_file: file /nonexistent/ca.pem"),
    ({"password_backends": "http"}, "password_backends: http needs auth_hook_url"),
    ({"password_backends": "http", "auth_hook_url": "ftp://x"}, "auth_hook_url: expected"),
    ({"password_backends": "http", "auth_hook_url": "http://127.0.0.1:1/",
      "auth_hook_token_file": "/nonexistent/t"}, "auth_hook_token_file: file /nonexistent/t"),
    ({"auth_cache_ttl": -1}, "auth_cache_ttl"),
])
def test_identity_keys_are_checked(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(").replace(
            ")", r"\)").replace("{", r"\{").replace("}", r"\}").replace(".", r"\.")):
        build_config(values, {})


def test_identity_keys_that_are_well_formed(tmp_path: Path) -> None:
    secret = tmp_path / "bind-password"
    secret.write_text("s3cret\n")
    config = build_config({
        "password_backends": ["store", "ldap", "http"],
        "ldap_url": "ldap://127.0.0.1:389", "ldap_search_base": "ou=people,dc=example,dc=org",
        "ldap_bind_dn": "cn=svc,dc=example,dc=org", "ldap_bind_password_file": str(secret),
        "auth_hook_url": "http://127.0.0.1:9/check",
    }, {"auth_cache_ttl": 5})
    assert config.password_backends == ("store", "ldap", "http")
    assert config.ldap_search_filter == "(uid={user})" and config.auth_cache_ttl == 5


def test_trisocks_check_names_an_identity_problem(tmp_path: Path) -> None:
    result = subprocess.run(
        [*TRISOCKS, "check", "--db", str(tmp_path / "t.db"), "--password-backends",
         "store,ldap", "--ldap-url", "ldap://127.0.0.1:1"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 2, result
    assert "ldap_user_dn: give either ldap_user_dn (direct bind) or ldap_search_base" in (
        result.stderr + result.stdout)


async def test_a_new_chain_adopts_what_the_old_one_remembers() -> None:
    ldap, hook = Backend("ldap", {b"gina": b"g"}), Backend("http", {b"hal": b"h"})
    old = Logins([Backend("store"), ldap, hook])
    await old.login(req("gina", "g"))
    await old.login(req("hal", "h"))
    new_ldap = Backend("ldap", {b"gina": b"g"})
    new = Logins([Backend("store"), new_ldap])  # a reload dropped the hook
    assert new.adopt(old) == ["http:hal"]  # nothing vouches for hal any more
    identity, request, backend = new.remembered()["ldap:gina"]
    assert backend is new_ldap and await backend.revalidate(identity, request)
