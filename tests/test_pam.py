"""The ``pam`` password backend (:mod:`trisocks.identity.pam`) against the host's real PAM:
a system user and a PAM service file (``pam_unix``) the tests create and remove, then end to
end through the proxy with curl and python-socks.

Creating users and writing ``/etc/pam.d`` needs root: without it the tests skip, unless ``CI``
is set, where they fail (CI runs them as root)."""

from __future__ import annotations

import grp
import logging
import os
import pwd
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

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
from trisocks.config import Config
from trisocks.identity.model import BackendError, Identity, LoginRequest
from trisocks.identity.pam import PamBackend, host_groups
from trisocks.policy.rule_parsing import parse_rules

StartProxy = Callable[..., Any]
Echo = tuple[str, int]

PAM_DIR = Path("/etc/pam.d")


def _need_root() -> None:
    why = None
    if os.geteuid() != 0:
        why = "the PAM tests create a system user and /etc/pam.d/trisocks-test-*: they need root"
    elif not all(shutil.which(p) for p in ("useradd", "userdel", "groupadd", "groupdel",
                                             "chpasswd", "usermod")):
        why = "the PAM tests need useradd, userdel, groupadd, groupdel, chpasswd and usermod " \
              "(Debian package passwd)"
    if why is not None:
        if os.environ.get("CI"):
            pytest.fail(f"{why} (CI is set, so this is a failure, not a skip)")
        pytest.skip(why)


def _run(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(argv, input=stdin, text=True, check=True, capture_output=True, timeout=30)


@attrs.frozen
class Account:
    """A system user the test created, its password, its extra group and its PAM service."""

    name: str
    password: str
    group: str
    service: str

    def lock(self) -> None:
        _run("usermod", "-L", self.name)


@pytest.fixture
def account() -> Iterator[Account]:
    _need_root()
    tag = secrets.token_hex(3)
    name, group, service = f"trisocks-t{tag}", f"trisocks-g{tag}", f"trisocks-test-{tag}"
    password = f"Pam-{secrets.token_hex(8)}"
    service_file = PAM_DIR / service
    try:
        _run("groupadd", group)
        _run("useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--groups", group,
             name)
        _run("chpasswd", stdin=f"{name}:{password}\n")
        service_file.write_text("# written by trisocks' tests/test_pam.py; removed after it\n"
                                "auth    required  pam_unix.so nodelay\n"
                                "account required  pam_unix.so\n")
        yield Account(name, password, group, service)
    finally:
        service_file.unlink(missing_ok=True)
        subprocess.run(["userdel", name], capture_output=True, timeout=30, check=False)
        subprocess.run(["groupdel", group], capture_output=True, timeout=30, check=False)


def pam_backend(service: str) -> PamBackend:
    return PamBackend(Config(password_backends=("pam",), pam_service=service))


def request(user: str | bytes, password: str | bytes) -> LoginRequest:
    return LoginRequest(user.encode() if isinstance(user, str) else user,
                        password.encode() if isinstance(password, str) else password,
                        client="127.0.0.1", listener="127.0.0.1:1080")


def primary_group(name: str) -> str:
    return grp.getgrgid(pwd.getpwnam(name).pw_gid).gr_name


# -- the backend alone ------------------------------------------------------------------------

async def test_right_password_gives_the_pam_identity_with_host_groups(account: Account) -> None:
    b = pam_backend(account.service)
    with trio.fail_after(20):
        identity = await b.login(request(account.name, account.password))
    assert identity is not None
    assert (identity.source, identity.name, identity.account) == (
        "pam", account.name, f"pam:{account.name}")
    assert {primary_group(account.name), account.group} <= identity.groups
    assert identity.groups == host_groups(account.name)


async def test_refusals(account: Account) -> None:
    b = pam_backend(account.service)
    with trio.fail_after(20):
        assert await b.login(request(account.name, account.password + "x")) is None
        assert await b.login(request(account.name, "")) is None
        assert await b.login(request(f"nobody-{secrets.token_hex(4)}", "whatever")) is None
        assert await b.login(request(b"\xff" + account.name.encode(), account.password)) is None
        assert await b.login(request(account.name + "\0", account.password)) is None
        assert await b.login(request(account.name, account.password + "\0")) is None


async def test_locked_account_is_refused_and_fails_revalidation(account: Account) -> None:
    b = pam_backend(account.service)
    login = request(account.name, account.password)
    with trio.fail_after(20):
        identity = await b.login(login)
        assert identity is not None
        assert await b.revalidate(identity, login) is True
        await trio.to_thread.run_sync(account.lock)
        assert await b.revalidate(identity, login) is False
        assert await b.login(login) is None


async def test_changed_password_fails_revalidation(account: Account) -> None:
    b = pam_backend(account.service)
    login = request(account.name, account.password)
    with trio.fail_after(20):
        identity = await b.login(login)
        assert identity is not None
        await trio.to_thread.run_sync(
            lambda: _run("chpasswd", stdin=f"{account.name}:Other-{secrets.token_hex(6)}\n"))
        assert await b.revalidate(identity, login) is False


async def test_a_service_that_is_not_installed_is_a_backend_error(account: Account) -> None:
    b = pam_backend(f"trisocks-absent-{secrets.token_hex(4)}")
    with trio.fail_after(20), pytest.raises(BackendError, match="is not installed"):
        await b.login(request(account.name, account.password))


async def test_a_broken_service_is_a_backend_error(account: Account) -> None:
    broken = PAM_DIR / f"{account.service}-broken"
    broken.write_text("auth required pam_trisocks_no_such_module.so\n"
                      "account required pam_trisocks_no_such_module.so\n")
    try:
        b = pam_backend(broken.name)
        with trio.fail_after(20), pytest.raises(BackendError, match="code"):
            await b.login(request(account.name, account.password))
    finally:
        broken.unlink()


@pytest.mark.deadline(30)
async def test_slow_checks_run_off_the_loop_and_concurrently(account: Account) -> None:
    # Without nodelay, pam_unix waits about two seconds (randomized) after a wrong password.
    slow = PAM_DIR / f"{account.service}-slow"
    slow.write_text("auth required pam_unix.so\naccount required pam_unix.so\n")
    b = pam_backend(slow.name)
    results: list[Identity | None] = []
    ticks = 0

    async def one(password: str) -> None:
        results.append(await b.login(request(account.name, password)))

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await trio.sleep(0.001)
            ticks += 1

    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ticker)
                start = trio.current_time()
                async with trio.open_nursery() as logins:
                    for _ in range(4):
                        logins.start_soon(one, "wrong")
                elapsed = trio.current_time() - start
                nursery.cancel_scope.cancel()
    finally:
        slow.unlink()
    assert results == [None] * 4
    assert 1.0 < elapsed < 5.0, elapsed  # four waits of ~2 s side by side, not one after another
    assert ticks > 100  # the loop kept running meanwhile


# -- end to end through the proxy -------------------------------------------------------------

async def pam_proxy(start_proxy: StartProxy, account: Account, **overrides: Any) -> Proxy:
    values: dict[str, Any] = {"password_backends": ("pam",), "pam_service": account.service,
                              "admin": ADMIN, "admin_token": TOKEN}
    values.update(overrides)
    return await start_proxy(**values)


async def test_curl_through_the_proxy_with_a_pam_login(
    start_proxy: StartProxy, account: Account, http_origin: HttpOrigin
) -> None:
    proxy = await pam_proxy(start_proxy, account)
    with trio.fail_after(30):
        result = await run_curl(
            "--fail", "-x", f"socks5h://{account.name}:{account.password}@127.0.0.1:{proxy.port}",
            http_origin.url.replace("127.0.0.1", "localhost"))
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == http_origin.body
        wrong = await run_curl("-x", f"socks5h://{account.name}:wrong@127.0.0.1:{proxy.port}",
                               http_origin.url)
        assert wrong.returncode == 97  # CURLE_PROXY: the proxy refused the login
        await eventually(lambda: not len(proxy.ctx.registry))
    usage = {u["user"]: u for u in proxy.ctx.accountant.live_usage()}
    assert usage[f"pam:{account.name}"]["bytes_down"] > len(http_origin.body)
    assert account.name not in usage


async def test_python_socks_session_and_api_listing(
    start_proxy: StartProxy, account: Account, echo_server: Echo
) -> None:
    from python_socks.async_.trio import Proxy as SocksProxy

    proxy = await pam_proxy(start_proxy, account)
    socks = SocksProxy.from_url(f"socks5://{account.name}:{account.password}@127.0.0.1:"
                                f"{proxy.port}")
    with trio.fail_after(20):
        stream = trio.SocketStream(await socks.connect(*echo_server))
        async with stream:
            await echo_round(stream, b"q" * 2345)
            (session,) = list(proxy.ctx.registry)
            assert session.user == f"pam:{account.name}"
            assert account.group in session.groups
        await eventually(lambda: not len(proxy.ctx.registry))
        async with httpx.AsyncClient(base_url=admin_url(proxy),
                                     headers={"Authorization": f"Bearer {TOKEN}"}) as api:
            users = (await api.get("/api/users")).json()["users"]
    (row,) = [u for u in users if u["user"] == f"pam:{account.name}"]
    assert row["source"] == "pam"
    assert (row["bytes_up"], row["bytes_down"]) == (2345, 2345)


async def test_a_rule_on_a_host_group(
    start_proxy: StartProxy, account: Account, echo_server: Echo
) -> None:
    rules = parse_rules([{"id": "no-test-group", "action": "deny",
                          "users": [f"@{account.group}"]}])
    proxy = await pam_proxy(start_proxy, account, rules=rules)
    u, p = account.name.encode(), account.password.encode()
    with trio.fail_after(20):
        stream = await trio.open_tcp_stream(*proxy.address)
        async with stream:
            await stream.send_all(b"\x05\x01\x02" + bytes([1, len(u)]) + u + bytes([len(p)]) + p)
            assert await receive_exactly(stream, 4) == b"\x05\x02\x01\x00"
            await stream.send_all(connect_request(*echo_server))
            rep, _, _ = await read_reply(stream)
    assert rep == 2  # connection not allowed by ruleset
    assert proxy.ctx.stats.denied["no-test-group"] == 1


async def test_locking_the_account_ends_its_live_session(
    start_proxy: StartProxy, account: Account, echo_server: Echo,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="trisocks.access")
    proxy = await pam_proxy(start_proxy, account, auth_revalidate_interval=0.2)
    with trio.fail_after(20):
        stream = await open_connect(proxy, echo_server, account.name, account.password)
        async with stream:
            await echo_round(stream, b"before")
            await trio.sleep(0.5)  # revalidated a few times: still valid
            await echo_round(stream, b"still")
            await trio.to_thread.run_sync(account.lock)
            assert await stream.receive_some(100) == b""  # the proxy closed it
        await eventually(lambda: any(r.name == "trisocks.access" for r in caplog.records), 5)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "trisocks.access"]
    assert f"pam:{account.name}" in line and "revoked by pam" in line
