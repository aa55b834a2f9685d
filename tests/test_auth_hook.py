"""The ``http`` password backend (:mod:`trisocks.identity.hook`) against a local hook
(:mod:`tests.hook_support`): its answers one by one, then end to end through the proxy with
curl and python-socks, the admin API, a rule on a hook group, revocation at the hook, and a
hook that hangs while other sessions keep moving."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.admin_support import ADMIN, TOKEN, admin_url, echo_round
from tests.conftest import (
    HttpOrigin,
    Proxy,
    connect_request,
    curl,
    eventually,
    open_connect,
    read_reply,
    receive_exactly,
    run_curl,
)
from tests.hook_support import Hook, start_hook
from trisocks.config import Config
from trisocks.identity.hook import HookBackend
from trisocks.identity.model import BackendError, Identity, LoginRequest
from trisocks.policy.rule_parsing import parse_rules

StartProxy = Callable[..., Any]
Echo = tuple[str, int]

LOGIN, SECRET, CANONICAL = "Carol", "hook-pass-1", "carol"
"""The login name, its password, and the name the hook makes canonical."""
ACCOUNT = f"http:{CANONICAL}"
HOOK_TOKEN = "hook-bearer-0123456789"


@pytest.fixture
async def hook(nursery: trio.Nursery) -> Hook:
    hook = await start_hook(nursery)
    hook.users[LOGIN] = (SECRET, CANONICAL, ["staff", "ops"])
    return hook


def backend(hook: Hook, tmp_path: Path, **overrides: Any) -> HookBackend:
    token = tmp_path / "hook.token"
    token.write_text(HOOK_TOKEN + "\n")
    values: dict[str, Any] = {"password_backends": ("http",), "auth_hook_url": hook.url,
                              "auth_hook_timeout": 2.0, "auth_hook_token_file": token}
    values.update(overrides)
    return HookBackend(Config(**values))


def request(user: str | bytes = LOGIN, password: str | bytes = SECRET) -> LoginRequest:
    return LoginRequest(user.encode() if isinstance(user, str) else user,
                        password.encode() if isinstance(password, str) else password,
                        client="192.0.2.7", listener="127.0.0.1:1080", method="socks5")


def answering(status: int, body: bytes | dict[str, Any]) -> Callable[[Any], tuple[int, bytes]]:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    return lambda _payload: (status, raw)


# -- the backend alone ------------------------------------------------------------------------

async def test_allow_gives_the_canonical_name_and_groups_and_sends_every_field(
    hook: Hook, tmp_path: Path
) -> None:
    b = backend(hook, tmp_path)
    try:
        with trio.fail_after(10):
            identity = await b.login(request())
    finally:
        await b.aclose()
    assert identity == Identity("http", CANONICAL, frozenset({"staff", "ops"}))
    assert identity.account == ACCOUNT
    (seen,) = hook.seen
    assert (seen.method, seen.target) == ("POST", "/check")
    assert seen.headers["authorization"] == f"Bearer {HOOK_TOKEN}"
    assert seen.headers["content-type"] == "application/json"
    assert seen.json == {"user": LOGIN, "password": SECRET, "client": "192.0.2.7",
                         "listener": "127.0.0.1:1080", "method": "socks5"}


async def test_no_token_file_sends_no_authorization(hook: Hook, tmp_path: Path) -> None:
    b = backend(hook, tmp_path, auth_hook_token_file=None)
    try:
        with trio.fail_after(10):
            assert await b.login(request()) is not None
    finally:
        await b.aclose()
    assert "authorization" not in hook.seen[0].headers


async def test_utf8_credentials_are_sent_as_text(hook: Hook, tmp_path: Path) -> None:
    hook.users["Zoë"] = ("pässwörd", "zoë", [])
    b = backend(hook, tmp_path)
    try:
        with trio.fail_after(10):
            identity = await b.login(request("Zoë", "pässwörd"))
    finally:
        await b.aclose()
    assert identity == Identity("http", "zoë")
    assert hook.seen[0].json["user"] == "Zoë" and hook.seen[0].json["password"] == "pässwörd"


@pytest.mark.parametrize("answer", [
    (200, {"allow": False}),
    (200, {"allow": False, "user": "carol"}),
    (401, {"error": "nope"}),
    (403, b""),
])
async def test_refusals(hook: Hook, tmp_path: Path, answer: tuple[int, Any]) -> None:
    hook.answer = answering(*answer)
    b = backend(hook, tmp_path)
    try:
        with trio.fail_after(10):
            assert await b.login(request()) is None
    finally:
        await b.aclose()
    assert len(hook.seen) == 1


async def test_wrong_password_is_refused(hook: Hook, tmp_path: Path) -> None:
    b = backend(hook, tmp_path)
    try:
        with trio.fail_after(10):
            assert await b.login(request(password="wrong")) is None
    finally:
        await b.aclose()


async def test_credentials_that_are_not_utf8_are_refused_without_asking(
    hook: Hook, tmp_path: Path
) -> None:
    b = backend(hook, tmp_path)
    try:
        with trio.fail_after(10):
            assert await b.login(request(b"\xff\xfe")) is None
            assert await b.login(request(LOGIN, b"\xc3\x28")) is None
    finally:
        await b.aclose()
    assert hook.seen == []


@pytest.mark.parametrize(("status", "body", "says"), [
    (500, b'{"allow": true, "user": "carol"}', "HTTP 500"),
    (502, b"", "HTTP 502"),
    (404, b"", "HTTP 404"),
    (204, b"", "HTTP 204"),
    (302, b"", "HTTP 302"),
    (200, b"<html>allow</html>", "not JSON"),
    (200, b'{"allow": "yes", "user": "carol"}', '"allow"'),
    (200, b'["allow"]', '"allow"'),
    (200, b'{"allow": true}', '"user"'),
    (200, b'{"allow": true, "user": ""}', '"user"'),
    (200, b'{"allow": true, "user": 7}', '"user"'),
    (200, b'{"allow": true, "user": "car\\nol"}', '"user"'),
    (200, b'{"allow": true, "user": "carol\\u0000"}', '"user"'),
    (200, b'{"allow": true, "user": "carol", "groups": "staff"}', '"groups"'),
    (200, b'{"allow": true, "user": "carol", "groups": ["staff", 3]}', '"groups"'),
])
async def test_anything_else_is_a_backend_error_naming_the_problem_not_the_password(
    hook: Hook, tmp_path: Path, status: int, body: bytes, says: str
) -> None:
    hook.answer = answering(status, body)
    b = backend(hook, tmp_path)
    try:
        with trio.fail_after(10), pytest.raises(BackendError) as raised:
            await b.login(request())
    finally:
        await b.aclose()
    assert says in str(raised.value)
    assert SECRET not in str(raised.value)
    assert len(hook.seen) == 1  # a redirect is not followed


async def test_a_hook_slower_than_the_timeout_is_a_backend_error(
    hook: Hook, tmp_path: Path
) -> None:
    hook.delay = 5.0
    b = backend(hook, tmp_path, auth_hook_timeout=0.3)
    try:
        start = trio.current_time()
        with trio.fail_after(10), pytest.raises(BackendError, match=r"within 0\.3 s"):
            await b.login(request())
        assert trio.current_time() - start < 3.0
    finally:
        await b.aclose()


async def test_a_hook_that_is_not_listening_is_a_backend_error(tmp_path: Path) -> None:
    with trio.socket.socket() as sock:  # a port nothing listens on (bound, never listening)
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        b = HookBackend(Config(auth_hook_url=f"http://127.0.0.1:{port}/check",
                               auth_hook_timeout=2.0))
        try:
            with trio.fail_after(10), pytest.raises(BackendError, match="cannot be reached"):
                await b.login(request())
        finally:
            await b.aclose()


async def test_revalidate_asks_again(hook: Hook, tmp_path: Path) -> None:
    b = backend(hook, tmp_path)
    try:
        with trio.fail_after(10):
            identity = await b.login(request())
            assert identity is not None
            assert await b.revalidate(identity, request()) is True
            hook.answer = answering(200, {"allow": True, "user": "someone-else"})
            assert await b.revalidate(identity, request()) is False
            hook.answer = answering(200, {"allow": False})
            assert await b.revalidate(identity, request()) is False
            hook.answer = answering(503, b"")
            with pytest.raises(BackendError):
                await b.revalidate(identity, request())
    finally:
        await b.aclose()
    assert len(hook.seen) == 5


# -- end to end through the proxy -------------------------------------------------------------

async def hook_proxy(start_proxy: StartProxy, hook: Hook, **overrides: Any) -> Proxy:
    values: dict[str, Any] = {"password_backends": ("http",), "auth_hook_url": hook.url,
                              "auth_hook_timeout": 2.0, "admin": ADMIN, "admin_token": TOKEN}
    values.update(overrides)
    return await start_proxy(**values)


async def test_curl_through_the_proxy_with_a_hook_login(
    start_proxy: StartProxy, hook: Hook, http_origin: HttpOrigin
) -> None:
    proxy = await hook_proxy(start_proxy, hook)
    with trio.fail_after(30):
        result = await run_curl(
            "--fail", "-x", f"socks5h://{LOGIN}:{SECRET}@127.0.0.1:{proxy.port}",
            http_origin.url.replace("127.0.0.1", "localhost"))
        assert result.returncode == 0, result.stderr.decode()
        assert result.stdout == http_origin.body
        wrong = await run_curl("-x", f"socks5h://{LOGIN}:wrong@127.0.0.1:{proxy.port}",
                               http_origin.url)
        assert wrong.returncode == 97  # CURLE_PROXY: the proxy refused the login
        await eventually(lambda: not len(proxy.ctx.registry))
    usage = {u["user"]: u for u in proxy.ctx.accountant.live_usage()}
    assert usage[ACCOUNT]["bytes_down"] > len(http_origin.body)
    assert LOGIN not in usage and CANONICAL not in usage
    assert [s.json["user"] for s in hook.seen] == [LOGIN, LOGIN]


async def test_http_proxy_basic_login_goes_to_the_hook_as_method_http(
    start_proxy: StartProxy, hook: Hook, http_origin: HttpOrigin
) -> None:
    proxy = await hook_proxy(start_proxy, hook)
    with trio.fail_after(30):
        result = await trio.run_process(
            [curl(), "--silent", "--show-error", "--fail", "--max-time", "20", "-x",
             f"http://{LOGIN}:{SECRET}@127.0.0.1:{proxy.port}", http_origin.url],
            capture_stdout=True, capture_stderr=True, check=False)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == http_origin.body
    assert hook.seen[0].json["method"] == "http"
    assert hook.seen[0].json["user"] == LOGIN


async def test_python_socks_session_is_the_hook_identity(
    start_proxy: StartProxy, hook: Hook, echo_server: Echo
) -> None:
    from python_socks.async_.trio import Proxy as SocksProxy

    proxy = await hook_proxy(start_proxy, hook)
    socks = SocksProxy.from_url(f"socks5://{LOGIN}:{SECRET}@127.0.0.1:{proxy.port}")
    with trio.fail_after(20):
        stream = trio.SocketStream(await socks.connect(*echo_server))
        async with stream:
            await echo_round(stream, b"p" * 4096)
            (session,) = list(proxy.ctx.registry)
            assert session.user == ACCOUNT
            assert session.groups == frozenset({"staff", "ops"})
    assert hook.seen[0].json["method"] == "socks5"
    assert hook.seen[0].json["client"] == "127.0.0.1"
    assert hook.seen[0].json["listener"] == f"127.0.0.1:{proxy.port}"


async def test_api_lists_the_hook_identity_with_its_source_and_exact_bytes(
    start_proxy: StartProxy, hook: Hook, echo_server: Echo
) -> None:
    proxy = await hook_proxy(start_proxy, hook)
    async with httpx.AsyncClient(base_url=admin_url(proxy),
                                 headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        with trio.fail_after(20):
            stream = await open_connect(proxy, echo_server, LOGIN, SECRET)
            async with stream:
                await echo_round(stream, b"u" * 1234)
            await eventually(lambda: not len(proxy.ctx.registry))
            users = (await api.get("/api/users")).json()["users"]
    (row,) = [u for u in users if u["user"] == ACCOUNT]
    assert row["source"] == "http"
    assert (row["bytes_up"], row["bytes_down"]) == (1234, 1234)


async def test_a_rule_on_a_hook_group(
    start_proxy: StartProxy, hook: Hook, echo_server: Echo
) -> None:
    hook.users["dave"] = ("dave-pass", "dave", ["interns"])
    rules = parse_rules([{"id": "no-interns", "action": "deny", "users": ["@interns"]}])
    proxy = await hook_proxy(start_proxy, hook, rules=rules)
    with trio.fail_after(20):
        stream = await open_connect(proxy, echo_server, LOGIN, SECRET)  # staff, ops: allowed
        async with stream:
            await echo_round(stream, b"ok")
        stream = await trio.open_tcp_stream(*proxy.address)
        async with stream:
            await stream.send_all(b"\x05\x01\x02\x01\x04dave\x09dave-pass")
            assert await receive_exactly(stream, 4) == b"\x05\x02\x01\x00"
            await stream.send_all(connect_request(*echo_server))
            rep, _, _ = await read_reply(stream)
    assert rep == 2  # connection not allowed by ruleset
    assert proxy.ctx.stats.denied["no-interns"] == 1


async def test_revocation_at_the_hook_ends_the_live_session(
    start_proxy: StartProxy, hook: Hook, echo_server: Echo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="trisocks.access")
    proxy = await hook_proxy(start_proxy, hook, auth_revalidate_interval=0.2)
    with trio.fail_after(20):
        stream = await open_connect(proxy, echo_server, LOGIN, SECRET)
        async with stream:
            await echo_round(stream, b"before")
            await trio.sleep(0.5)  # revalidated a few times: still allowed
            await echo_round(stream, b"still")
            hook.answer = answering(200, {"allow": False})
            assert await stream.receive_some(100) == b""  # the proxy closed it
        await eventually(lambda: any(r.name == "trisocks.access" for r in caplog.records), 5)
    (line,) = [r.getMessage() for r in caplog.records if r.name == "trisocks.access"]
    assert ACCOUNT in line and "revoked by http" in line


async def test_a_hook_that_hangs_does_not_stop_other_sessions(
    start_proxy: StartProxy, hook: Hook, echo_server: Echo
) -> None:
    proxy = await hook_proxy(start_proxy, hook, auth_hook_timeout=10.0)
    with trio.fail_after(30):
        stream = await open_connect(proxy, echo_server, LOGIN, SECRET)  # before the hang
        async with stream:
            hook.delay = 8.0
            waiting = await trio.open_tcp_stream(*proxy.address)
            async with waiting:
                await waiting.send_all(b"\x05\x01\x02\x01\x04erin\x04pass")
                assert await receive_exactly(waiting, 2) == b"\x05\x02"
                await eventually(lambda: hook.waiting == 1)
                start = trio.current_time()
                for i in range(20):  # the live session relays while the login waits
                    await echo_round(stream, bytes([65 + i]) * 10_000)
                assert trio.current_time() - start < 4.0
                assert hook.waiting == 1  # the login is still waiting on the hook
