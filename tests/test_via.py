"""Through a rule's ``via`` parents: CONNECT via another trisocks (SOCKS5 and HTTP CONNECT),
socks5 vs socks5h, failover and marking down, credentials from a file; UDP and BIND via a
trisocks parent; Dante (CONNECT, UDP, BIND) and microsocks (CONNECT) as parents."""

from __future__ import annotations

import functools
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import PASSWORD, USER, HttpOrigin, Proxy, curl, eventually
from tests.test_connect import closed_port
from tests.test_interop_tools import run_tool, same
from tests.test_udp import start_udp_echo
from trisocks.admin.metrics import ProxyCollector
from trisocks.admin.shapes import session_json
from trisocks.client import SocksReplyError, open_socks_bind, open_socks_stream, open_socks_udp
from trisocks.config import ConfigError, build_config
from trisocks.fleet.directory import row_of, view_of
from trisocks.policy import parse_rules
from trisocks.protocol import Address, Reply
from trisocks.sessions import Session

StartProxy = Callable[..., Any]


def via_rules(*urls: str, **fields: Any) -> Any:
    return parse_rules([{"id": "up", "action": "allow", "via": list(urls),
                         "commands": ["connect"], **fields}])


def parent_url(proxy: Proxy, scheme: str = "socks5h", auth: str = f"{USER}:{PASSWORD}@") -> str:
    return f"{scheme}://{auth}{proxy.host}:{proxy.port}"


def requested(proxy: Proxy) -> list[str]:
    """The targets *proxy*'s sessions asked for, as they arrive."""
    targets: list[str] = []
    proxy.ctx.registry.add_listener(
        lambda event, s: targets.append(str(s.target)) if event == "request" else None)
    return targets


async def echo_via(child: Proxy, host: str, port: int, data: bytes = b"ping") -> None:
    stream = await open_socks_stream(child.address, host, port, auth=(USER, PASSWORD))
    async with stream:
        await stream.send_all(data)
        assert await stream.receive_some(100) == data


def access(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.session for r in caplog.records  # type: ignore[attr-defined]
            if r.name == "trisocks.access"]


async def test_connect_through_a_trisocks_parent(
    start_proxy: StartProxy, echo_server: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    parent = await start_proxy()
    seen = requested(parent)
    child = await start_proxy(rules=via_rules(parent_url(parent, "socks5")))
    label = f"socks5://127.0.0.1:{parent.port}"
    with trio.fail_after(10):
        async with await open_socks_stream(child.address, *echo_server, auth=(USER, PASSWORD)):
            [live] = [session_json(s.view()) for s in child.ctx.registry]
            assert live["parent"] == label
        await eventually(lambda: len(access(caplog)) == 2)
    assert seen == [f"127.0.0.1:{echo_server[1]}"]
    [mine] = [s for s in access(caplog) if s["parent"] is not None]
    assert mine["parent"] == label and mine["resolved"] == f"127.0.0.1:{echo_server[1]}"
    assert any(f"parent={label}" in r.getMessage() for r in caplog.records)
    assert child.ctx.stats.parent_sessions[label] == 1
    assert not child.ctx.stats.parent_failures
    metrics = {m.name: m for m in ProxyCollector(child.ctx).collect()}
    [sample] = metrics["trisocks_parent_sessions"].samples
    assert sample.labels == {"parent": label} and sample.value == 1


@pytest.mark.parametrize("scheme", ["socks5", "socks5h", "http"])
async def test_what_the_parent_is_asked_for(
    scheme: str, start_proxy: StartProxy, echo_server: tuple[str, int], loopback_dns: None
) -> None:
    """socks5: the name is resolved (and judged) here, the parent gets the address; socks5h
    and HTTP CONNECT pass the name."""
    parent = await start_proxy()
    seen = requested(parent)
    child = await start_proxy(rules=via_rules(parent_url(parent, scheme)))
    with trio.fail_after(10):
        await echo_via(child, "echo.trisocks.test", echo_server[1])
    name = "127.0.0.1" if scheme == "socks5" else "echo.trisocks.test"
    assert seen == [f"{name}:{echo_server[1]}"]


@pytest.mark.parametrize("scheme", ["socks5", "http"])
async def test_ipv6_target_through_a_parent(
    scheme: str, start_proxy: StartProxy, echo_server6: tuple[str, int]
) -> None:
    parent = await start_proxy()
    seen = requested(parent)
    child = await start_proxy(rules=via_rules(parent_url(parent, scheme)))
    with trio.fail_after(10):
        await echo_via(child, *echo_server6)
    assert seen == [f"[::1]:{echo_server6[1]}"]


async def test_socks5_parent_names_are_judged_here(
    start_proxy: StartProxy, echo_server: tuple[str, int], loopback_dns: None
) -> None:
    parent = await start_proxy()
    rules = parse_rules([
        {"id": "no-loop", "action": "deny", "to": "127.0.0.0/8"},
        {"id": "up", "action": "allow", "via": [parent_url(parent, "socks5")],
         "commands": ["connect"]},
    ])
    child = await start_proxy(rules=rules)
    with trio.fail_after(10), pytest.raises(SocksReplyError) as info:
        await echo_via(child, "echo.trisocks.test", echo_server[1])
    assert info.value.reply == Reply.NOT_ALLOWED
    assert child.ctx.stats.denied["no-loop"] == 1


async def test_a_rule_deciding_on_addresses_routes_after_resolving(
    start_proxy: StartProxy, echo_server: tuple[str, int], loopback_dns: None
) -> None:
    """A name whose rule matches its addresses (``to`` a network) is resolved here first; the
    parent then gets the judged address, whatever its kind."""
    parent = await start_proxy()
    seen = requested(parent)
    rules = parse_rules([{"id": "up", "action": "allow", "to": "127.0.0.0/8",
                          "via": [parent_url(parent, "socks5h")], "commands": ["connect"]}])
    child = await start_proxy(rules=rules)
    with trio.fail_after(10):
        await echo_via(child, "echo.trisocks.test", echo_server[1])
    assert seen == [f"127.0.0.1:{echo_server[1]}"]


async def test_the_parents_refusal_is_the_targets_answer(start_proxy: StartProxy) -> None:
    parent = await start_proxy()
    child = await start_proxy(rules=via_rules(parent_url(parent), parent_url(parent, "http")))
    with trio.fail_after(10), pytest.raises(SocksReplyError) as info:
        await echo_via(child, "127.0.0.1", closed_port())
    assert info.value.reply == Reply.CONNECTION_REFUSED
    assert not child.ctx.stats.parent_failures  # not down: it answered for the target
    assert child.ctx.stats.parent_sessions == {}


async def test_http_parent_statuses_map_to_replies(start_proxy: StartProxy) -> None:
    parent = await start_proxy(rules=parse_rules([
        {"id": "no", "action": "deny", "to": "127.0.0.0/8", "ports": [9]}]))
    child = await start_proxy(rules=via_rules(parent_url(parent, "http")))
    with trio.fail_after(10):
        for port, reply in ((9, Reply.NOT_ALLOWED), (closed_port(), Reply.HOST_UNREACHABLE)):
            with pytest.raises(SocksReplyError) as info:
                await echo_via(child, "127.0.0.1", port)
            assert info.value.reply == reply
    assert not child.ctx.stats.parent_failures


async def counting_listener(nursery: trio.Nursery) -> tuple[int, list[int]]:
    """A parent that is "down": it accepts and closes at once; returns its port and a list
    that grows by one per connection."""
    accepted: list[int] = []

    async def handler(stream: trio.SocketStream) -> None:
        accepted.append(1)
        await stream.aclose()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0,
                                                      host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1], accepted


async def test_failover_skips_a_down_parent_and_marks_it_down(
    start_proxy: StartProxy, echo_server: tuple[str, int], nursery: trio.Nursery
) -> None:
    parent = await start_proxy()
    port, accepted = await counting_listener(nursery)
    dead = f"socks5://{USER}:{PASSWORD}@127.0.0.1:{closed_port()}"
    broken = f"socks5h://127.0.0.1:{port}"
    child = await start_proxy(rules=via_rules(dead, broken, parent_url(parent)))
    stats = child.ctx.stats
    with trio.fail_after(10):
        await echo_via(child, *echo_server)
        assert len(accepted) == 1
        assert stats.parent_failures == {dead.replace(f"{USER}:{PASSWORD}@", ""): 1,
                                         broken: 1}
        for _ in range(3):  # both are marked down: later sessions go straight to the third
            await echo_via(child, *echo_server)
        assert len(accepted) == 1 and sum(stats.parent_failures.values()) == 2
        assert stats.parent_sessions[f"socks5h://127.0.0.1:{parent.port}"] == 4


async def test_all_parents_down_are_tried_anyway_then_rep_01(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    port, accepted = await counting_listener(nursery)
    child = await start_proxy(rules=via_rules(f"socks5://127.0.0.1:{port}"), via_down_for=60)
    with trio.fail_after(10):
        for tries in (1, 2):
            with pytest.raises(SocksReplyError) as info:
                await echo_via(child, "127.0.0.1", 9)
            assert info.value.reply == Reply.GENERAL_FAILURE and len(accepted) == tries


async def test_a_silent_parent_is_skipped_after_via_timeout(
    start_proxy: StartProxy, echo_server: tuple[str, int], nursery: trio.Nursery
) -> None:
    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()

    listeners = await nursery.start(functools.partial(trio.serve_tcp, silent, 0,
                                                      host="127.0.0.1"))
    port = listeners[0].socket.getsockname()[1]
    parent = await start_proxy()
    child = await start_proxy(rules=via_rules(f"socks5://127.0.0.1:{port}", parent_url(parent)),
                              via_timeout=0.3)
    with trio.fail_after(10):
        start = trio.current_time()
        await echo_via(child, *echo_server)
        assert 0.3 <= trio.current_time() - start < 5
    assert child.ctx.stats.parent_failures[f"socks5://127.0.0.1:{port}"] == 1


async def test_parent_password_from_a_file(
    start_proxy: StartProxy, echo_server: tuple[str, int], tmp_path: Path
) -> None:
    parent = await start_proxy()
    secret = tmp_path / "parent.pw"
    secret.write_text("wrong\n")
    url = f"socks5://{USER}@127.0.0.1:{parent.port}?password_file={secret}"
    child = await start_proxy(rules=via_rules(url, url.replace("socks5", "http")))
    with trio.fail_after(10):
        with pytest.raises(SocksReplyError) as info:  # both refuse the login: parents failed
            await echo_via(child, *echo_server)
        assert info.value.reply == Reply.GENERAL_FAILURE
        secret.write_text(PASSWORD + "\n")  # read at connect time: the next session uses it
        await echo_via(child, *echo_server)


async def test_http_connect_parent_with_curl(
    start_proxy: StartProxy, http_origin: HttpOrigin, loopback_dns: None
) -> None:
    parent = await start_proxy()
    child = await start_proxy(rules=via_rules(parent_url(parent, "http")))
    seen = requested(parent)
    url = http_origin.url.replace("127.0.0.1", "localhost")
    body = await run_tool([curl(), "-s", "--socks5-hostname",
                           f"{USER}:{PASSWORD}@127.0.0.1:{child.port}", url])
    assert same(body, http_origin.body)
    assert seen == [f"localhost:{http_origin.port}"]


async def test_http_clients_of_the_child_go_through_the_parent(
    start_proxy: StartProxy, http_origin: HttpOrigin
) -> None:
    """HTTP forwarding (absolute-form GET) uses the same dial, so it goes through too."""
    parent = await start_proxy()
    child = await start_proxy(rules=via_rules(parent_url(parent)))
    seen = requested(parent)
    body = await run_tool([curl(), "-s", "-x", f"http://{USER}:{PASSWORD}@127.0.0.1:{child.port}",
                           http_origin.url])
    assert same(body, http_origin.body)
    assert seen == [f"127.0.0.1:{http_origin.port}"]


ALL = ["connect", "bind", "udp"]


async def udp_echo_via(child: Proxy, target: Any, rounds: int = 3) -> None:
    async with open_socks_udp(child.address, auth=(USER, PASSWORD)) as udp:
        for i in range(rounds):
            with trio.fail_after(2):
                await udp.send_to(b"dgram %d" % i, (target[0], target[1]))
                data, source = await udp.receive_from()
            assert data == b"dgram %d" % i and source == (target[0], target[1])


async def test_udp_through_a_trisocks_parent(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    target = await start_udp_echo(nursery, "127.0.0.1")
    parent = await start_proxy()
    seen = requested(parent)
    child = await start_proxy(rules=via_rules(parent_url(parent, "http"), parent_url(parent),
                                              commands=ALL))
    with trio.fail_after(10):
        await udp_echo_via(child, target)
    assert len(seen) == 1  # one parent association, the http parent passed over
    assert child.ctx.stats.parent_sessions[f"socks5h://127.0.0.1:{parent.port}"] == 1
    assert not child.ctx.stats.parent_failures


async def test_udp_datagrams_are_judged_here(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    target = await start_udp_echo(nursery, "127.0.0.1")
    parent = await start_proxy()
    rules = parse_rules([
        {"id": "no", "action": "deny", "commands": ["udp"], "to": "127.0.0.0/8",
         "ports": [target[1]]},
        {"id": "up", "action": "allow", "via": [parent_url(parent)], "commands": ALL},
    ])
    child = await start_proxy(rules=rules)
    async with open_socks_udp(child.address, auth=(USER, PASSWORD)) as udp:
        await udp.send_to(b"x", target)
        await eventually(lambda: child.ctx.stats.udp_dropped["not_allowed"] == 1)
    assert parent.ctx.stats.bytes_up == 0


async def test_bind_through_a_trisocks_parent(start_proxy: StartProxy) -> None:
    parent = await start_proxy()
    child = await start_proxy(rules=via_rules(parent_url(parent), commands=ALL))
    with trio.fail_after(10):
        async with open_socks_bind(child.address, "127.0.0.1", 0,
                                   auth=(USER, PASSWORD)) as binding:
            host, port = binding.address
            parent_listener = {s.id for s in parent.ctx.registry if s.command == 2}
            assert parent_listener  # the parent is the one listening
            peer = await trio.open_tcp_stream(host, port)
            async with peer:
                stream, source = await binding.accept()
                assert source == peer.socket.getsockname()[:2]
                await peer.send_all(b"from the peer")
                assert await stream.receive_some(100) == b"from the peer"
                await stream.send_all(b"from the client")
                assert await peer.receive_some(100) == b"from the client"
    assert child.ctx.stats.parent_sessions[f"socks5h://127.0.0.1:{parent.port}"] == 1


async def test_udp_and_bind_reach_the_parent_from_the_egress_address(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    target = await start_udp_echo(nursery, "127.0.0.1")
    parent = await start_proxy()
    clients: list[tuple[int, str]] = []
    parent.ctx.registry.add_listener(lambda event, s: clients.append(
        (int(s.command), s.client.host)) if event == "request" else None)
    child = await start_proxy(rules=via_rules(parent_url(parent), commands=ALL,
                                              egress="127.0.0.2"))
    with trio.fail_after(10):
        await udp_echo_via(child, target)  # the parent admits datagrams from 127.0.0.2 only
        async with open_socks_bind(child.address, "127.0.0.1", 0,
                                   auth=(USER, PASSWORD)) as binding:
            peer = await trio.open_tcp_stream(*binding.address)
            async with peer:
                stream, _ = await binding.accept()
                await peer.send_all(b"hello")
                assert await stream.receive_some(100) == b"hello"
    assert clients == [(3, "127.0.0.2"), (2, "127.0.0.2")]  # UDP, then BIND


async def test_bind_through_a_parent_times_out_with_rep_06(start_proxy: StartProxy) -> None:
    parent = await start_proxy()
    child = await start_proxy(rules=via_rules(parent_url(parent), commands=ALL),
                              bind_timeout=0.3, max_binds_per_user=1)
    with trio.fail_after(10):
        for _ in range(2):  # the reservation is given back: a second BIND is not over limit
            async with open_socks_bind(child.address, "127.0.0.1", 0,
                                       auth=(USER, PASSWORD)) as binding:
                with pytest.raises(SocksReplyError) as info:
                    await binding.accept()
                assert info.value.reply == Reply.TTL_EXPIRED
            await eventually(lambda: not list(child.ctx.registry))


async def test_bind_refused_by_the_parent_is_the_answer(start_proxy: StartProxy) -> None:
    parent = await start_proxy(rules=parse_rules([
        {"id": "no-bind", "action": "deny", "commands": ["bind"]}]))
    child = await start_proxy(rules=via_rules(parent_url(parent), commands=ALL))
    with trio.fail_after(10), pytest.raises(SocksReplyError) as info:
        async with open_socks_bind(child.address, "127.0.0.1", 0, auth=(USER, PASSWORD)):
            pass
    assert info.value.reply == Reply.NOT_ALLOWED


def test_check_refuses_bind_and_udp_through_http_parents_only() -> None:
    http = {"id": "up", "action": "allow", "via": ["http://10.0.0.3:3128"]}
    for commands, left in ((None, "bind or udp"), (["connect", "udp"], "udp")):
        rule = {**http, **({"commands": commands} if commands else {})}
        with pytest.raises(ConfigError, match=f"only http parents.*carry {left}"):
            build_config({"rules": [rule]}, {})
    build_config({"rules": [{**http, "commands": ["connect"]}]}, {})
    build_config({"rules": [{**http, "via": ["http://10.0.0.3:3128",
                                             "socks5://10.0.0.2:1080"]}]}, {})
    # egress with via: the parent is reached from the egress address, for every command
    build_config({"rules": [{"id": "up", "action": "allow", "via": ["socks5://10.0.0.2:1080"],
                             "egress": "127.0.0.2"}]}, {})


async def test_the_parent_is_reached_from_the_egress_address(
    start_proxy: StartProxy, echo_server: tuple[str, int]
) -> None:
    parent = await start_proxy()
    sources: list[str] = []
    parent.ctx.registry.add_listener(
        lambda event, s: sources.append(s.client.host) if event == "start" else None)
    child = await start_proxy(rules=via_rules(parent_url(parent, "socks5h"), egress="127.0.0.2"))
    ended: list[dict[str, Any]] = []
    child.ctx.registry.add_listener(
        lambda event, s: ended.append(session_json(s.view())) if event == "end" else None)
    with trio.fail_after(10):
        await echo_via(child, *echo_server)
        await eventually(lambda: ended)
    assert sources == ["127.0.0.2"]  # the parent saw the child connect from its egress
    assert (ended[0]["egress"], ended[0]["parent"]) == (
        "127.0.0.2", f"socks5h://127.0.0.1:{parent.port}")


# --- Other servers as parents -----------------------------------------------------------------


def program(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is not installed (scripts/test installs it)")
        pytest.skip(f"{name} is not installed")
    return path


def free_port() -> int:
    return closed_port()


@pytest.fixture
def microsocks() -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([program("microsocks"), "-i", "127.0.0.1", "-p", str(port),
                             "-u", USER, "-P", PASSWORD],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


DANTE_CONF = """\
logoutput: stderr
internal: 127.0.0.1 port = {port}
external: 127.0.0.1
clientmethod: none
socksmethod: none
user.privileged: root
user.unprivileged: nobody
client pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0 }}
socks pass {{ from: 127.0.0.0/8 to: 0.0.0.0/0
  command: connect bind udpassociate bindreply udpreply }}
"""


@pytest.fixture
def dante(tmp_path: Path) -> Iterator[int]:
    danted = program("danted")
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the Dante test needs root (user.privileged: root)")
        pytest.skip("the Dante test needs root (user.privileged: root)")
    port = free_port()
    conf = tmp_path / "danted.conf"
    conf.write_text(DANTE_CONF.format(port=port))
    with open(tmp_path / "danted.err", "wb") as err:
        proc = subprocess.Popen([danted, "-f", str(conf), "-p", str(tmp_path / "danted.pid")],
                                stdout=subprocess.DEVNULL, stderr=err)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


async def wait_listening(port: int) -> None:
    async def up() -> bool:
        try:
            stream = await trio.open_tcp_stream("127.0.0.1", port)
        except OSError:
            return False
        await stream.aclose()
        return True

    await eventually(up, limit=10, interval=0.05)


async def test_microsocks_as_parent(
    start_proxy: StartProxy, echo_server: tuple[str, int], microsocks: int
) -> None:
    await wait_listening(microsocks)
    child = await start_proxy(rules=via_rules(f"socks5://{USER}:{PASSWORD}@127.0.0.1:{microsocks}"))
    with trio.fail_after(10):
        await echo_via(child, *echo_server)
    assert child.ctx.stats.parent_sessions[f"socks5://127.0.0.1:{microsocks}"] == 1


async def test_microsocks_without_udp_is_passed_over(
    start_proxy: StartProxy, microsocks: int, nursery: trio.Nursery
) -> None:
    """microsocks has CONNECT only: UDP goes to the next parent, microsocks is not down."""
    await wait_listening(microsocks)
    target = await start_udp_echo(nursery, "127.0.0.1")
    parent = await start_proxy()
    micro = f"socks5://{USER}:{PASSWORD}@127.0.0.1:{microsocks}"
    child = await start_proxy(rules=via_rules(micro, parent_url(parent), commands=ALL))
    with trio.fail_after(10):
        await udp_echo_via(child, target, rounds=1)
    assert not child.ctx.stats.parent_failures
    assert child.ctx.stats.parent_sessions == {f"socks5h://127.0.0.1:{parent.port}": 1}


async def test_dante_as_parent(
    start_proxy: StartProxy, echo_server: tuple[str, int], dante: int, loopback_dns: None
) -> None:
    await wait_listening(dante)
    child = await start_proxy(rules=via_rules(f"socks5://127.0.0.1:{dante}"))
    with trio.fail_after(10):
        await echo_via(child, *echo_server)
        await echo_via(child, "echo.trisocks.test", echo_server[1])  # resolved here
    assert child.ctx.stats.parent_sessions[f"socks5://127.0.0.1:{dante}"] == 2


async def bind_echo_via(child: Proxy) -> None:
    async with open_socks_bind(child.address, "127.0.0.1", 0, auth=(USER, PASSWORD)) as binding:
        peer = await trio.open_tcp_stream(*binding.address)
        async with peer:
            stream, _ = await binding.accept()
            await peer.send_all(b"hello")
            assert await stream.receive_some(100) == b"hello"
            await stream.send_all(b"back")
            assert await peer.receive_some(100) == b"back"


async def test_dante_as_parent_for_udp_and_bind(
    start_proxy: StartProxy, dante: int, nursery: trio.Nursery
) -> None:
    await wait_listening(dante)
    target = await start_udp_echo(nursery, "127.0.0.1")
    child = await start_proxy(rules=via_rules(f"socks5://127.0.0.1:{dante}", commands=ALL))
    with trio.fail_after(15):
        await udp_echo_via(child, target)
        await bind_echo_via(child)
    assert child.ctx.stats.parent_sessions[f"socks5://127.0.0.1:{dante}"] == 2


def test_the_fleet_directory_keeps_the_parent() -> None:
    session = Session("s1", Address.of("127.0.0.1", 5000))
    session.parent = "socks5h://10.0.0.2:1080"
    assert view_of(row_of("host/1", session.view())).parent == "socks5h://10.0.0.2:1080"
