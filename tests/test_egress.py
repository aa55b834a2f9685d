"""Issue 16, ``egress``: the source address outbound traffic leaves from, per rule.

Origins on loopback record the source address of every connection and datagram: a user's
rule gives its address (127.0.0.2 for one user, 127.0.0.3 for another), a list goes
round-robin, ``egress_pick = "sticky"`` keeps one per identity, ``egress_missing`` refuses
(REP 03) or falls back for a target of a family the rule has none of, UDP leaves from the
egress address, an IPv6 prefix gives each session its own random address (in a network
namespace the test makes: :mod:`tests.egress_netns`), and the start-time check
(:func:`trisocks.server.egress.check_egress`, ``trisocks check``) refuses an address that is
not on this host.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import (
    USER,
    Proxy,
    connect_request,
    eventually,
    have_ipv6,
    make_config,
    read_reply,
    receive_all,
    socks_handshake,
)
from tests.test_cli import run
from tests.test_udp import LOCALHOST4, associate, header, open_udp
from trisocks.admin.server import serve_with_admin
from trisocks.admin.shapes import session_json
from trisocks.config import ConfigError
from trisocks.passwords import hash_password
from trisocks.policy import parse_rules
from trisocks.server.egress import check_egress, local_routes
from trisocks.server.reload import reload_config
from trisocks.store.sqlite import Store

StartProxy = Callable[..., Any]
BOB, BOB_PASSWORD = "bob", "bob-pass-123"
REPO = Path(__file__).parent.parent


@pytest.fixture
def bob(store: Store) -> None:
    store.add_user(BOB, hash_password(BOB_PASSWORD.encode()))


async def _tell_peer(stream: trio.SocketStream) -> None:
    """The origin: answer the connection's source IP, then close."""
    async with stream:
        peer = stream.socket.getpeername()[0]
        try:
            await stream.send_all(peer.encode())
        except (trio.BrokenResourceError, OSError):
            pass


async def start_origin(nursery: trio.Nursery, host: str) -> tuple[str, int]:
    listeners = await nursery.start(functools.partial(trio.serve_tcp, _tell_peer, 0, host=host))
    address, port = listeners[0].socket.getsockname()[:2]
    return address, port


@pytest.fixture
async def origin(nursery: trio.Nursery) -> tuple[str, int]:
    return await start_origin(nursery, "127.0.0.1")


async def source_seen(
    proxy: Proxy, target: tuple[str, int], user: str | None = USER, password: str | None = None
) -> str:
    """CONNECT through *proxy* as *user*; the source IP the origin saw."""
    stream = await proxy.open_raw()
    async with stream:
        await socks_handshake(stream, user, password or ("s3cret-pass" if user == USER else None))
        await stream.send_all(connect_request(*target))
        rep, _, _ = await read_reply(stream)
        assert rep == 0
        return (await receive_all(stream)).decode()


async def start_recording_udp_echo(nursery: trio.Nursery) -> tuple[int, list[Any]]:
    """A UDP echo on 127.0.0.1: its port, and the source of every datagram it got."""
    sources: list[Any] = []
    echo = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    await echo.bind(("127.0.0.1", 0))

    async def echo_recording() -> None:
        with echo:
            while True:
                data, source = await echo.recvfrom(65536)
                sources.append(source)
                await echo.sendto(data, source)

    nursery.start_soon(echo_recording)
    return echo.getsockname()[1], sources


def rules(*tables: dict[str, Any]) -> tuple[Any, ...]:
    return parse_rules(list(tables))


async def test_one_address_per_user(
    start_proxy: StartProxy, origin: tuple[str, int], bob: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "trisocks.access")
    proxy = await start_proxy(rules=rules(
        {"id": "alice-out", "action": "allow", "users": [USER], "egress": "127.0.0.2"},
        {"id": "bob-out", "action": "allow", "users": [BOB], "egress": ["127.0.0.3"]},
    ))
    with trio.fail_after(10):
        assert await source_seen(proxy, origin) == "127.0.0.2"
        assert await source_seen(proxy, origin, BOB, BOB_PASSWORD) == "127.0.0.3"
        assert await source_seen(proxy, origin) == "127.0.0.2"
        await eventually(lambda: len(
            [r for r in caplog.records if r.name == "trisocks.access"]) == 3)
    logged = [r.session for r in caplog.records if r.name == "trisocks.access"]  # type: ignore[attr-defined]
    assert [(s["user"], s["egress"], s["rule"]) for s in logged] == [
        (USER, "127.0.0.2", "alice-out"), (BOB, "127.0.0.3", "bob-out"),
        (USER, "127.0.0.2", "alice-out")]
    assert " egress=127.0.0.3" in [r for r in caplog.records if r.name == "trisocks.access"
                                   ][1].getMessage()


async def test_the_api_shows_a_live_sessions_egress(
    start_proxy: StartProxy, echo_server: tuple[str, int]
) -> None:
    proxy = await start_proxy(rules=rules(
        {"id": "out", "action": "allow", "egress": "127.0.0.2"}))
    with trio.fail_after(10):
        stream = await proxy.open_raw()
        async with stream:
            await socks_handshake(stream)
            await stream.send_all(connect_request(*echo_server))
            assert (await read_reply(stream))[0] == 0
            [session] = proxy.ctx.registry.select()
            shown = session_json(session.view())
            assert shown["egress"] == "127.0.0.2"
            assert shown["resolved"] == f"127.0.0.1:{echo_server[1]}"
    plain = await start_proxy()  # no egress: the field is null
    with trio.fail_after(10):
        stream = await plain.open_raw()
        async with stream:
            await socks_handshake(stream)
            await stream.send_all(connect_request(*echo_server))
            assert (await read_reply(stream))[0] == 0
            [session] = plain.ctx.registry.select()
            assert session_json(session.view())["egress"] is None


async def test_round_robin_over_the_list(
    start_proxy: StartProxy, origin: tuple[str, int]
) -> None:
    proxy = await start_proxy(rules=rules(
        {"id": "pool", "action": "allow", "egress": ["127.0.0.2", "127.0.0.3"]}))
    with trio.fail_after(10):
        seen = [await source_seen(proxy, origin) for _ in range(4)]
    assert seen == ["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3"]


async def test_sticky_keeps_one_address_per_identity(
    start_proxy: StartProxy, origin: tuple[str, int], bob: None
) -> None:
    pool = [f"127.0.0.{n}" for n in range(2, 10)]
    proxy = await start_proxy(rules=rules(
        {"id": "sticky", "action": "allow", "egress": pool, "egress_pick": "sticky"}))
    with trio.fail_after(20):
        alice = {await source_seen(proxy, origin) for _ in range(4)}
        bobs = {await source_seen(proxy, origin, BOB, BOB_PASSWORD) for _ in range(4)}
    assert len(alice) == 1 and len(bobs) == 1
    assert alice | bobs <= set(pool)
    # Anonymous sessions: the client's IP is the identity.
    anonymous = await start_proxy(auth=("none",), rules=rules(
        {"id": "sticky", "action": "allow", "egress": pool, "egress_pick": "sticky"}))
    with trio.fail_after(10):
        assert len({await source_seen(anonymous, origin, None) for _ in range(3)}) == 1


async def test_no_address_of_the_targets_family_refuses_with_rep_03_or_falls_back(
    start_proxy: StartProxy, nursery: trio.Nursery, origin: tuple[str, int]
) -> None:
    if not have_ipv6():
        pytest.fail("this machine has no IPv6 loopback; the IPv6 tests need ::1")
    origin6 = await start_origin(nursery, "::1")
    refuse = await start_proxy(rules=rules(
        {"id": "v4-only", "action": "allow", "egress": ["127.0.0.2"]}))
    with trio.fail_after(10):
        stream = await refuse.open_raw()
        async with stream:
            await socks_handshake(stream)
            await stream.send_all(connect_request(*origin6))
            rep, _, _ = await read_reply(stream)
            assert rep == 3  # network unreachable
            assert await receive_all(stream) == b""
        await eventually(lambda: refuse.ctx.stats.replies[3] == 1)
        assert await source_seen(refuse, origin) == "127.0.0.2"  # IPv4 still leaves from it
    fallback = await start_proxy(rules=rules(
        {"id": "v4-or-default", "action": "allow", "egress": ["127.0.0.2"],
         "egress_missing": "fallback"}))
    with trio.fail_after(10):
        assert await source_seen(fallback, origin6) == "::1"  # the host's default
        assert await source_seen(fallback, origin) == "127.0.0.2"


async def test_refusal_reason_names_the_rule(
    start_proxy: StartProxy, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    if not have_ipv6():
        pytest.fail("this machine has no IPv6 loopback; the IPv6 tests need ::1")
    caplog.set_level(logging.INFO, "trisocks.access")
    origin6 = await start_origin(nursery, "::1")
    proxy = await start_proxy(rules=rules(
        {"id": "v4-only", "action": "allow", "egress": ["127.0.0.2"]}))
    with trio.fail_after(10):
        stream = await proxy.open_raw()
        async with stream:
            await socks_handshake(stream)
            await stream.send_all(connect_request(*origin6))
            assert (await read_reply(stream))[0] == 3
        await eventually(lambda: any(r.name == "trisocks.access" for r in caplog.records))
    [record] = [r for r in caplog.records if r.name == "trisocks.access"]
    assert "egress: no IPv6 address in rule 'v4-only'" in record.session["reason"]  # type: ignore[attr-defined]


async def test_udp_datagrams_leave_from_the_egress_address(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    port, sources = await start_recording_udp_echo(nursery)
    proxy = await start_proxy(rules=rules(
        {"id": "udp-out", "action": "allow", "egress": ["127.0.0.3", "127.0.0.4"]}))
    with trio.fail_after(10):
        control, relay = await associate(proxy)
        with await open_udp() as client:
            async with control:
                for n in range(3):
                    packet = header(LOCALHOST4, port) + b"dgram%d" % n
                    await client.sendto(packet, relay)
                    data, _ = await client.recvfrom(65536)
                    assert data == packet
                [session] = proxy.ctx.registry.select()
                assert session_json(session.view())["egress"] == "127.0.0.3"
    # One association keeps one source (round-robin picks once per association).
    assert {s[0] for s in sources} == {"127.0.0.3"} and len({s[1] for s in sources}) == 1


def test_check_refuses_an_address_not_on_this_host(tmp_path: Path) -> None:
    config_file = tmp_path / "trisocks.toml"
    config_file.write_text(
        f'db = "{tmp_path / "t.db"}"\nlisten = ["127.0.0.1:0"]\n'
        '[[rules]]\nid = "customer-a"\naction = "allow"\negress = ["127.0.0.2", "192.0.2.77"]\n'
    )
    result = run("check", "--config", str(config_file))
    assert result.returncode == 2, result.stderr
    assert "rule 'customer-a': egress 192.0.2.77 is not an address of this host" in result.stderr
    assert "127.0.0.2" not in result.stderr  # bindable: no problem
    served = run("serve", "--config", str(config_file))  # serve refuses to start too
    assert served.returncode == 2
    assert "rule 'customer-a': egress 192.0.2.77" in served.stderr
    config_file.write_text(
        f'db = "{tmp_path / "t.db"}"\nlisten = ["127.0.0.1:0"]\n'
        '[[rules]]\nid = "customer-a"\naction = "allow"\negress = ["127.0.0.2", "::1"]\n'
    )
    assert run("check", "--config", str(config_file)).returncode == 0


def test_check_wants_a_local_route_for_a_prefix(db_path: Path) -> None:
    prefix = "2001:db8:7e57::/64"
    config = make_config(db_path, rules=rules(
        {"id": "pool6", "action": "allow", "egress": prefix}))
    routed = any(ipaddress.IPv6Network(prefix).subnet_of(r) for r in local_routes())
    problems = check_egress(config)
    if routed:  # this host happens to route it locally
        assert problems == []
    else:
        assert problems == [f"rules: rule 'pool6': egress {prefix}: no local route covers it "
                            f"(ip -6 route add local {prefix} dev lo)"]


def _netns_missing() -> str | None:
    if os.geteuid() != 0:
        return "the IPv6 prefix test makes a network namespace: it needs root"
    if shutil.which("ip") is None:
        return "the IPv6 prefix test needs ip(8) (apt-get install iproute2)"
    return None


def test_ipv6_prefix_gives_each_session_its_own_random_address() -> None:
    reason = _netns_missing()
    if reason is not None:
        if os.environ.get("CI"):
            pytest.fail(f"the netns test must run in CI: {reason}")
        pytest.skip(reason)
    ns = f"trisocks-egress-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True, timeout=10)
    try:
        for command in (["link", "set", "lo", "up"],
                        ["-6", "route", "add", "local", "2001:db8:7::/64", "dev", "lo"],
                        ["-6", "addr", "add", "2001:db8:8::1/128", "dev", "lo"]):
            subprocess.run(["ip", "-n", ns, *command], check=True, timeout=10)
        result = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "tests.egress_netns",
             "2001:db8:7::/64", "2001:db8:8::1", "8"],
            cwd=REPO, capture_output=True, text=True, timeout=60,
        )
    finally:
        subprocess.run(["ip", "netns", "del", ns], timeout=10)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    prefix = ipaddress.IPv6Network("2001:db8:7::/64")
    seen = [ipaddress.IPv6Address(a) for a in report["seen"]]
    assert len(seen) == 8 and all(a in prefix for a in seen)
    assert len(set(seen)) == 8  # distinct per session (2**64 addresses: no collision)
    assert report["egress"] == report["seen"]  # the API's egress is what the origin saw
    assert report["problems"] == []  # the start-time check passes where the route is
    assert report["unrouted_problems"] == [
        "rules: rule 'pool6': egress 2001:db8:9::/64: no local route covers it "
        "(ip -6 route add local 2001:db8:9::/64 dev lo)"]
    assert report["ipv4"] == 3  # an IPv4 target: no IPv4 egress, the rule refuses (REP 03)


def test_curl_through_a_users_egress(tmp_path: Path) -> None:
    """A real client: curl through SOCKS5 (--socks5-hostname), HTTP forwarding and HTTP
    CONNECT, to an HTTP origin that answers its peer's IP."""
    if shutil.which("curl") is None:
        if os.environ.get("CI"):
            pytest.fail("curl is missing (apt-get install curl)")
        pytest.skip("curl is missing (apt-get install curl)")
    trio.run(_curl_run, tmp_path)


async def _curl_run(tmp_path: Path) -> None:
    async def http_origin(stream: trio.SocketStream) -> None:
        async with stream:
            request = b""
            with trio.move_on_after(5):
                while b"\r\n\r\n" not in request and len(request) < 65536:
                    chunk = await stream.receive_some(4096)
                    if not chunk:
                        return
                    request += chunk
            body = stream.socket.getpeername()[0].encode()
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close"
                                  b"\r\n\r\n%s" % (len(body), body))

    store = Store(tmp_path / "curl.db")
    store.add_user(USER, hash_password(b"s3cret-pass"))
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                listeners = await nursery.start(
                    functools.partial(trio.serve_tcp, http_origin, 0, host="127.0.0.1"))
                port = listeners[0].socket.getsockname()[1]
                config = make_config(tmp_path / "curl.db", rules=rules(
                    {"id": "curl-out", "action": "allow", "egress": "127.0.0.5"}))
                ctx = await nursery.start(serve_with_admin, config, store)
                host, proxy_port = ctx.listening[0][:2]
                results = []
                for how in (["--socks5-hostname", f"{USER}:s3cret-pass@{host}:{proxy_port}"],
                            ["-x", f"http://{USER}:s3cret-pass@{host}:{proxy_port}"],  # forward
                            ["-p", "-x", f"http://{USER}:s3cret-pass@{host}:{proxy_port}"]):
                    results.append(await trio.run_process(
                        ["curl", "-sS", "--max-time", "10", *how, f"http://localhost:{port}/"],
                        capture_stdout=True, capture_stderr=True, check=False))
                nursery.cancel_scope.cancel()
    finally:
        store.close()
    for result in results:  # SOCKS5, HTTP forwarding, HTTP CONNECT
        assert result.returncode == 0, result.stderr
        assert result.stdout == b"127.0.0.5"


async def test_reload_rejects_an_address_not_on_this_host(
    start_proxy: StartProxy, origin: tuple[str, int], db_path: Path
) -> None:
    proxy = await start_proxy(rules=rules({"id": "out", "action": "allow", "egress": "127.0.0.2"}))
    proxy.ctx.load_config = lambda: make_config(db_path, rules=rules(
        {"id": "out", "action": "allow", "egress": "192.0.2.77"}))
    with pytest.raises(ConfigError, match=r"rule 'out': egress 192\.0\.2\.77 is not an address"):
        reload_config(proxy.ctx)
    with trio.fail_after(10):
        assert await source_seen(proxy, origin) == "127.0.0.2"  # the running rules stay
    proxy.ctx.load_config = lambda: make_config(db_path, rules=rules(
        {"id": "out", "action": "allow", "egress": "127.0.0.3"}))
    reload_config(proxy.ctx)
    with trio.fail_after(10):
        assert await source_seen(proxy, origin) == "127.0.0.3"  # new sessions, new route


async def test_reload_gives_new_sessions_the_new_route_live_ones_keep_theirs(
    start_proxy: StartProxy, nursery: trio.Nursery, db_path: Path
) -> None:
    port, sources = await start_recording_udp_echo(nursery)
    proxy = await start_proxy(rules=rules({"id": "out", "action": "allow", "egress": "127.0.0.3"}))

    async def round_trip(client: Any, relay: Any, n: int) -> None:
        packet = header(LOCALHOST4, port) + b"dgram%d" % n
        await client.sendto(packet, relay)
        data, _ = await client.recvfrom(65536)
        assert data == packet

    with trio.fail_after(10):
        control, relay = await associate(proxy)
        with await open_udp() as client:
            async with control:
                await round_trip(client, relay, 1)
                proxy.ctx.load_config = lambda: make_config(db_path, rules=rules(
                    {"id": "out", "action": "allow", "egress": "127.0.0.4"}))
                reload_config(proxy.ctx)
                await round_trip(client, relay, 2)  # the live association keeps its route
                fresh_control, fresh_relay = await associate(proxy)
                with await open_udp() as fresh:
                    async with fresh_control:
                        await round_trip(fresh, fresh_relay, 3)  # a new one takes the new
    assert [source[0] for source in sources] == ["127.0.0.3", "127.0.0.3", "127.0.0.4"]
