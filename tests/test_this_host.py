"""Destination judging sees every way to say "this host": the address rules unit by unit, a
table of spellings x commands x rule forms over loopback, ``@admin`` and ``@local``, the shipped
defaults for remote clients (through a PROXY protocol header), and generated spellings."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.admin_support import ADMIN, TOKEN
from tests.conftest import (
    connect_request,
    make_config,
    read_reply,
    receive_exactly,
    socks_handshake,
)
from tests.test_udp import LOCALHOST4, ZEROS4, header, open_udp, start_udp_echo
from trisocks.admin.server import serve_with_admin
from trisocks.policy import DEFAULT_RULES, Query, RuleError, RuleSet, parse_rules
from trisocks.policy.addresses import (
    LOCAL_NETWORKS,
    canonical,
    host_networks,
    judged,
    numeric_host,
    parse_fib_trie,
    parse_if_inet6,
    reached,
)
from trisocks.protocol import Address, AddressType
from trisocks.protocol.proxy import encode_v2
from trisocks.server.dial import literal, reach
from trisocks.server.reload import reload_config
from trisocks.store.sqlite import Store

ip = ipaddress.ip_address
StartProxy = Callable[..., Any]
RULE_ID = "this-host"

# --- the address rules ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spelling", "address"),
    [
        ("0", "0.0.0.0"),
        ("127.1", "127.0.0.1"),
        ("127.1.", "127.0.0.1"),
        ("2130706433", "127.0.0.1"),
        ("0x7f.0.0.1", "127.0.0.1"),
        ("0X7F.1", "127.0.0.1"),
        ("0177.0.0.01", "127.0.0.1"),
        ("127.0.0.1.", "127.0.0.1"),
        ("10.1.65535", "10.1.255.255"),
        ("::ffff:127.0.0.1", "::ffff:127.0.0.1"),
        ("::1", "::1"),
        ("::", "::"),
        # Not numbers to the resolver: names, looked up as such.
        ("08", None),
        ("0x", None),
        ("256.1", None),
        ("1.16777216", None),
        ("1.2.3.4.5", None),
        ("127.0.0.1..", None),
        (".127.0.0.1", None),
        ("127.0.0.1 x", None),
        ("localhost", None),
        ("", None),
        (".", None),
    ],
)
def test_numeric_names_are_the_address_they_spell(spelling: str, address: str | None) -> None:
    assert numeric_host(spelling) == (None if address is None else ip(address))


def resolver_numeric(text: str) -> Any:
    """What the system resolver makes of *text* as a number (``AI_NUMERICHOST``), or None."""
    try:
        infos = socket.getaddrinfo(text, None, flags=socket.AI_NUMERICHOST)
    except (socket.gaierror, UnicodeError, ValueError):
        return None
    return ip(infos[0][4][0])


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789abcdefxX.:", max_size=24))
def test_numeric_host_agrees_with_the_resolver(text: str) -> None:
    """For text without a trailing dot (which the resolver would send to DNS and we strip),
    a name is a number exactly when ``getaddrinfo`` says so, and the same one."""
    if text.endswith("."):
        assert numeric_host(text) == resolver_numeric(text[:-1])
    else:
        assert numeric_host(text) == resolver_numeric(text)


@pytest.mark.parametrize(
    ("address", "forms", "dialed"),
    [
        ("10.0.0.1", ["10.0.0.1"], "10.0.0.1"),
        ("0.0.0.0", ["0.0.0.0", "127.0.0.1"], "127.0.0.1"),
        ("0.1.2.3", ["0.1.2.3", "127.0.0.1"], "0.1.2.3"),
        ("::", ["::", "::1"], "::1"),
        ("::1", ["::1"], "::1"),
        ("::ffff:10.0.0.1", ["10.0.0.1"], "10.0.0.1"),
        ("::ffff:0.0.0.0", ["0.0.0.0", "127.0.0.1"], "127.0.0.1"),
        ("::10.0.0.1", ["10.0.0.1"], "10.0.0.1"),
        ("::0.0.0.2", ["0.0.0.2", "127.0.0.1"], "0.0.0.2"),
        ("fe80::1%2", ["fe80::1"], "fe80::1%2"),
        ("2001:db8::1", ["2001:db8::1"], "2001:db8::1"),
    ],
)
def test_addresses_are_judged_and_dialed_as_the_kernel_reaches_them(
    address: str, forms: list[str], dialed: str
) -> None:
    assert judged(ip(address)) == tuple(ip(f) for f in forms)
    assert reached(ip(address)) == ip(dialed)
    assert canonical(ip(address)) == ip(forms[0])


def test_targets_are_dialed_in_the_reached_form() -> None:
    assert reach((socket.AF_INET6, ("::ffff:127.0.0.1", 80, 0, 0))) == (
        socket.AF_INET, ("127.0.0.1", 80))
    assert reach((socket.AF_INET, ("0.0.0.0", 80))) == (socket.AF_INET, ("127.0.0.1", 80))
    assert reach((socket.AF_INET6, ("::", 80, 0, 0))) == (socket.AF_INET6, ("::1", 80, 0, 0))
    same = (socket.AF_INET6, ("fe80::1", 80, 0, 3))
    assert reach(same) is same
    assert literal(Address("0x7f.1", 80, AddressType.DOMAIN)) == Address.of("127.0.0.1", 80)
    name = Address("example.com", 80, AddressType.DOMAIN)
    assert literal(name) is name


FIB_TRIE = """\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     |-- 192.0.2.0
        /24 link UNICAST
Local:
  +-- 0.0.0.0/0 3 0 5
     +-- 127.0.0.0/8 2 0 2
        |-- 127.0.0.0
           /8 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     |-- 10.9.0.0
        /16 host LOCAL
     |-- 192.0.2.2
        /32 host LOCAL
     |-- 192.0.2.255
        /32 link BROADCAST
"""
IF_INET6 = """\
fd000000000000000000000000000002 04 40 00 82     eth0
fe8000000000000000fc00fffe000001 04 40 20 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
garbage
"""


def test_local_routes_and_ipv6_addresses_are_read_from_proc(tmp_path: Path) -> None:
    assert parse_fib_trie(FIB_TRIE) == {ipaddress.ip_network(n) for n in (
        "127.0.0.0/8", "10.9.0.0/16", "192.0.2.2/32")}
    assert parse_if_inet6(IF_INET6) == {ipaddress.ip_network(n) for n in (
        "fd00::2/128", "fe80::fc:ff:fe00:1/128", "::1/128")}
    (tmp_path / "fib_trie").write_text(FIB_TRIE)
    (tmp_path / "if_inet6").write_text(IF_INET6)
    found = host_networks(tmp_path)
    assert set(LOCAL_NETWORKS) <= found
    assert ipaddress.ip_network("10.9.0.0/16") in found
    assert ipaddress.ip_network("fd00::2/128") in found
    # A missing /proc still gives loopback, unspecified and getifaddrs' view.
    assert set(LOCAL_NETWORKS) <= host_networks(tmp_path / "absent")


def test_every_interface_address_of_this_host_is_local() -> None:
    """On this machine: every address the OS lists for its interfaces is in ``@local``."""
    found = host_networks()
    assert set(LOCAL_NETWORKS) <= found
    proc = Path("/proc/net")
    if proc.is_dir():  # the kernel's own lists, read independently of getifaddrs
        assert parse_if_inet6((proc / "if_inet6").read_text()) <= found
        assert parse_fib_trie((proc / "fib_trie").read_text()) <= found
    addresses = {n.network_address for n in found if n.prefixlen == n.max_prefixlen}
    rules = RuleSet(parse_rules([{"id": "r", "action": "deny", "to": "@local"}]),
                    default_allow=True, local=found)
    for address in addresses:
        assert not rules.decide(q(ip=address)).allowed, address


def q(**fields: Any) -> Query:
    base: dict[str, Any] = {
        "client": ip("192.0.2.10"), "user": "alice", "command": "connect",
        "host": None, "ip": ip("198.51.100.7"), "port": 443,
    }
    base.update(fields)
    return Query(**base)


def rule_id(rules: RuleSet, query: Query) -> str:
    decision = rules.decide(query)
    assert decision is not None
    return decision.rule_id if not decision.allowed else "allowed"


def test_admin_matches_every_address_that_reaches_it() -> None:
    here = [ip("192.0.2.2"), ip("2001:db8::2")]
    rules = parse_rules([{"id": "admin", "action": "deny", "to": "@admin"}])
    v4 = RuleSet(rules, default_allow=True, admin=("0.0.0.0", 8080), local=here)
    for target in ("127.0.0.9", "0.0.0.0", "192.0.2.2", "::ffff:192.0.2.2", "0.3.0.0"):
        assert rule_id(v4, q(ip=ip(target), port=8080)) == "admin", target
    for target, port in (("192.0.2.2", 8081), ("192.0.2.3", 8080), ("::1", 8080)):
        assert rule_id(v4, q(ip=ip(target), port=port)) == "allowed", target
    both = RuleSet(rules, default_allow=True, admin=("::", 8080), local=here)
    for target in ("::", "::1", "2001:db8::2", "127.0.0.1", "192.0.2.2", "0.0.0.0"):
        assert rule_id(both, q(ip=ip(target), port=8080)) == "admin", target
    loop6 = RuleSet(rules, default_allow=True, admin=("::1", 8080))
    assert rule_id(loop6, q(ip=ip("::"), port=8080)) == "admin"
    assert rule_id(loop6, q(ip=ip("127.0.0.1"), port=8080)) == "allowed"


def test_local_in_from_and_to() -> None:
    here = [ip("192.0.2.2"), ip("::ffff:198.51.100.1")]
    rules = RuleSet(parse_rules(DEFAULT_RULES), default_allow=True, local=here)
    remote = ip("203.0.113.5")
    for target in ("127.0.0.1", "127.3.4.5", "0.0.0.0", "::", "::1", "192.0.2.2",
                   "198.51.100.1", "::ffff:127.0.0.1", "::127.0.0.1"):
        assert rule_id(rules, q(client=remote, ip=ip(target))) == "proxy-host", target
        assert rule_id(rules, q(client=remote, ip=ip(target), command="udp")) == "proxy-host"
        # A client on this host (any of its addresses, in any form) may reach them.
        for client in ("127.0.0.1", "::1", "192.0.2.2", "::ffff:127.0.0.1"):
            assert rule_id(rules, q(client=ip(client), ip=ip(target))) == "allowed"
    assert rule_id(rules, q(client=remote, ip=ip("192.0.2.3"))) == "allowed"
    # BIND's 0.0.0.0 is "any peer", not this host.
    assert rule_id(rules, q(client=remote, ip=ip("0.0.0.0"), command="bind", port=0)) \
        == "allowed"
    assert rule_id(rules, q(client=remote, ip=ip("127.0.0.1"), command="bind", port=0)) \
        == "proxy-host"


@pytest.mark.parametrize(
    ("entries", "client", "matches"),
    [
        (["!@local"], "203.0.113.5", True),
        (["!@local"], "127.0.0.1", False),
        (["@local"], "127.0.0.1", True),
        (["@local"], "203.0.113.5", False),
        (["203.0.113.0/24", "!203.0.113.5"], "203.0.113.5", False),
        (["203.0.113.0/24", "!203.0.113.5"], "203.0.113.6", True),
        (["!::ffff:203.0.113.0/120"], "203.0.113.6", False),
    ],
)
def test_from_entries_include_and_exclude(entries: list[str], client: str, matches: bool) -> None:
    rules = RuleSet(parse_rules([{"id": "r", "action": "deny", "from": entries}]),
                    default_allow=True)
    assert (rule_id(rules, q(client=ip(client))) == "r") is matches


def test_bind_any_peer_is_not_this_host() -> None:
    rules = RuleSet(parse_rules([{"id": "r", "action": "deny", "to": "127.0.0.0/8"}]),
                    default_allow=True)
    assert rule_id(rules, q(command="bind", ip=ip("0.0.0.0"), port=0)) == "allowed"
    assert rule_id(rules, q(command="bind", ip=ip("::ffff:0.0.0.0"), port=0)) == "allowed"
    assert rule_id(rules, q(command="bind", ip=ip("0.0.0.7"), port=0)) == "r"
    assert rule_id(rules, q(command="connect", ip=ip("0.0.0.0"))) == "r"


def test_bad_from_entry_is_named() -> None:
    with pytest.raises(RuleError, match="from"):
        parse_rules([{"id": "r", "action": "deny", "from": "!nonsense"}])


# --- spellings x commands x rule forms, end to end ----------------------------------------------

SPELLINGS = [  # (ATYP, text): every one reaches 127.0.0.1
    (1, "127.0.0.1"),
    (1, "0.0.0.0"),
    (4, "::ffff:127.0.0.1"),
    (4, "::ffff:0.0.0.0"),
    (4, "::127.0.0.1"),
    (3, "0"),
    (3, "0.0.0.0"),
    (3, "127.1"),
    (3, "2130706433"),
    (3, "0x7f.0.0.1"),
    (3, "0177.0.0.01"),
    (3, "127.0.0.1."),
    (3, "0x7f000001."),
    (3, "::ffff:127.0.0.1"),
    (3, "::ffff:7f00:1"),
]
UNSPECIFIED = {"0.0.0.0", "::ffff:0.0.0.0", "0"}
"""For BIND these mean "any peer" (RFC 1928), not this host."""
RULE_FORMS = {
    "cidr": ["127.0.0.0/8"],
    "mapped-cidr": ["::ffff:127.0.0.0/104"],
    "local": ["@local"],
}


def dst(atyp: int, text: str) -> bytes:
    """ATYP | DST.ADDR for *text* sent as *atyp*."""
    if atyp == 1:
        return b"\x01" + socket.inet_aton(text)
    if atyp == 4:
        return b"\x04" + socket.inet_pton(socket.AF_INET6, text)
    return bytes([3, len(text)]) + text.encode()


def request(cmd: int, atyp: int, text: str, port: int) -> bytes:
    return bytes([5, cmd, 0]) + dst(atyp, text) + port.to_bytes(2, "big")


async def reply_to(address: tuple[str, int], data: bytes, prefix: bytes = b"") -> int:
    """REP for one request, the connection then closed by us."""
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        if prefix:
            await stream.send_all(prefix)
        await socks_handshake(stream)
        await stream.send_all(data)
        rep, _, _ = await read_reply(stream)
        return rep


async def connect_and_echo(address: tuple[str, int], data: bytes) -> None:
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await socks_handshake(stream)
        await stream.send_all(data)
        rep, _, _ = await read_reply(stream)
        assert rep == 0
        await stream.send_all(b"ping")
        assert await receive_exactly(stream, 4) == b"ping"


async def associate(address: tuple[str, int]) -> tuple[trio.SocketStream, Any]:
    control = await trio.open_tcp_stream(*address)
    await socks_handshake(control)
    await control.send_all(b"\x05\x03\x00" + ZEROS4 + b"\x00\x00")
    rep, addr, relay_port = await read_reply(control)
    assert (rep, addr) == (0, LOCALHOST4)
    return control, ("127.0.0.1", relay_port)


async def udp_drops(
    address: tuple[str, int], spellings: list[tuple[int, str]], denied: int, allowed: int
) -> None:
    """Send one datagram per spelling to port *denied*, then one to 127.0.0.1:*allowed*, whose
    echo comes back: the relay handles datagrams in order, so the others were judged first."""
    control, relay = await associate(address)
    async with control:
        with await open_udp() as client:
            for atyp, text in spellings:
                await client.sendto(header(dst(atyp, text), denied) + b"no", relay)
            await client.sendto(header(LOCALHOST4, allowed) + b"yes", relay)
            data, _ = await client.recvfrom(65536)
            assert data == header(LOCALHOST4, allowed) + b"yes"


@pytest.mark.parametrize("form", sorted(RULE_FORMS))
@pytest.mark.parametrize("command", ["connect", "udp", "bind"])
async def test_every_spelling_of_a_denied_address_is_denied(
    start_proxy: StartProxy,
    nursery: trio.Nursery,
    echo_server: tuple[str, int],
    command: str,
    form: str,
) -> None:
    with trio.fail_after(20):
        denied_echo = await start_udp_echo(nursery, "127.0.0.1")
        allowed_echo = await start_udp_echo(nursery, "127.0.0.1")
        port = denied_echo[1] if command == "udp" else echo_server[1]
        rules = parse_rules([{"id": RULE_ID, "action": "deny", "to": RULE_FORMS[form],
                              "ports": [port]}])
        proxy = await start_proxy(rules=rules)
        spellings = [s for s in SPELLINGS if command != "bind" or s[1] not in UNSPECIFIED]
        if command == "udp":
            await udp_drops(proxy.address, spellings, port, allowed_echo[1])
            assert proxy.ctx.stats.udp_dropped["not_allowed"] == len(spellings)
            assert proxy.ctx.stats.denied[RULE_ID] >= 1  # counted once per cached decision
        else:
            cmd = 1 if command == "connect" else 2
            for atyp, text in spellings:
                assert await reply_to(proxy.address, request(cmd, atyp, text, port)) == 2, text
            assert proxy.ctx.stats.denied[RULE_ID] == len(spellings)


async def test_every_spelling_reaches_the_loopback_origin_when_allowed(
    start_proxy: StartProxy, nursery: trio.Nursery, echo_server: tuple[str, int]
) -> None:
    """What was judged is what is dialed: each spelling connects to (and sends to) 127.0.0.1."""
    with trio.fail_after(20):
        proxy = await start_proxy()
        for atyp, text in SPELLINGS:
            await connect_and_echo(proxy.address, request(1, atyp, text, echo_server[1]))
        udp_echo = await start_udp_echo(nursery, "127.0.0.1")
        control, relay = await associate(proxy.address)
        async with control:
            with await open_udp() as client:
                for atyp, text in SPELLINGS:
                    await client.sendto(header(dst(atyp, text), udp_echo[1]) + b"hi", relay)
                    data, _ = await client.recvfrom(65536)
                    assert data == header(LOCALHOST4, udp_echo[1]) + b"hi", text
        assert proxy.ctx.stats.udp_dropped.total() == 0


@pytest.mark.parametrize("to", [["@local"], ["127.0.0.0/8"], ["@local", "127.0.0.0/8"]])
async def test_bind_any_peer_spellings_are_not_this_host(
    start_proxy: StartProxy, to: list[str]
) -> None:
    """BIND's all-zeros DST.ADDR (however written) is "any peer", not an address to judge as
    this host: a rule denying this host leaves it alone."""
    proxy = await start_proxy(rules=parse_rules([{"id": RULE_ID, "action": "deny", "to": to}]))
    with trio.fail_after(10):
        for atyp, text in [s for s in SPELLINGS if s[1] in UNSPECIFIED]:
            assert await reply_to(proxy.address, request(2, atyp, text, 0)) == 0, text
    assert proxy.ctx.stats.denied[RULE_ID] == 0


async def test_admin_endpoint_is_denied_in_every_spelling(
    start_proxy: StartProxy, nursery: trio.Nursery
) -> None:
    """The shipped rules, a client on this host: the admin port answers REP 02 however the
    address is written, for CONNECT and for datagrams."""
    with trio.fail_after(20):
        proxy = await start_proxy(admin=ADMIN, admin_token=TOKEN)
        assert proxy.ctx.admin_address is not None
        port = proxy.ctx.admin_address[1]
        for atyp, text in SPELLINGS:
            assert await reply_to(proxy.address, request(1, atyp, text, port)) == 2, text
        assert proxy.ctx.stats.denied["admin-endpoint"] == len(SPELLINGS)
        echo = await start_udp_echo(nursery, "127.0.0.1")  # an allowed target, for ordering
        await udp_drops(proxy.address, SPELLINGS, port, echo[1])
        assert proxy.ctx.stats.udp_dropped["not_allowed"] == len(SPELLINGS)


async def test_shipped_defaults_deny_the_proxy_host_to_remote_clients(
    start_proxy: StartProxy, echo_server: tuple[str, int]
) -> None:
    """A remote client (named by a PROXY protocol header) gets REP 02 for every address of
    this host; a local one (LOCAL header: the socket's 127.0.0.1) reaches the origin."""
    with trio.fail_after(20):
        proxy = await start_proxy(proxy_protocol=True)
        port = echo_server[1]
        here = sorted({str(n.network_address) for n in proxy.ctx.judge.local
                       if n.prefixlen == n.max_prefixlen})
        targets = [*SPELLINGS, *((4 if ":" in h else 1, h) for h in here)]
        for source in (("203.0.113.7", 40000), ("2001:db8::7", 40000)):
            server = ("::1", 1080) if ":" in source[0] else ("127.0.0.1", 1080)
            prefix = encode_v2(source, server)
            for atyp, text in targets:
                rep = await reply_to(proxy.address, request(1, atyp, text, port), prefix)
                assert rep == 2, (source, text)
            # BIND's 0.0.0.0 is "any peer", not this host.
            assert await reply_to(proxy.address, request(2, 1, "0.0.0.0", 0), prefix) == 0
        assert proxy.ctx.stats.denied["proxy-host"] == 2 * len(targets)
        stream = await trio.open_tcp_stream(*proxy.address)
        async with stream:
            await stream.send_all(encode_v2(None))
            await socks_handshake(stream)
            await stream.send_all(connect_request(*echo_server))
            assert (await read_reply(stream))[0] == 0


async def test_reload_reads_the_interface_addresses_again(
    start_proxy: StartProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = await start_proxy()
    ctx = proxy.ctx
    extra = ipaddress.ip_network("198.51.100.9/32")
    assert extra not in ctx.judge.ruleset.local
    ctx.load_config = lambda: ctx.config
    monkeypatch.setattr("trisocks.server.judge.host_networks",
                        lambda: frozenset({*LOCAL_NETWORKS, extra}))
    reload_config(ctx)
    assert extra in ctx.judge.ruleset.local
    decision = ctx.judge.ruleset.decide(q(ip=ip("198.51.100.9")))
    assert decision is not None and decision.rule_id == "proxy-host"


# --- generated spellings ----------------------------------------------------------------------


def _aton_spelling(value: int, parts: int, bases: list[int], upper: bool) -> str:
    """*value* written as inet_aton takes it: *parts* numbers, the last filling the rest."""
    sizes = [1] * (parts - 1) + [4 - (parts - 1)]
    numbers = []
    shift = 32
    for size in sizes:
        shift -= 8 * size
        numbers.append((value >> shift) & ((1 << (8 * size)) - 1))
    out = []
    for number, base in zip(numbers, bases, strict=False):
        if base == 16:
            out.append(f"0X{number:X}" if upper else f"0x{number:x}")
        elif base == 8:
            out.append(f"0{number:o}")
        else:
            out.append(str(number))
    return ".".join(out)


@st.composite
def spellings(draw: st.DrawFn) -> tuple[int, str]:
    """Some spelling of an address in 127.0.0.0/8 or 0.0.0.0/8 (all of them this host)."""
    first = draw(st.sampled_from([0, 127]))
    value = first << 24 | draw(st.integers(0, (1 << 24) - 1))
    v4 = ipaddress.IPv4Address(value)
    kind = draw(st.sampled_from(["ipv4", "mapped", "compat", "name", "name6"]))
    if kind == "ipv4":
        return 1, str(v4)
    if kind == "mapped" or (kind == "compat" and value < 2):
        return 4, f"::ffff:{v4}"
    if kind == "compat":
        return 4, str(ipaddress.IPv6Address(value))
    if kind == "name6":
        text = str(ipaddress.IPv6Address((0xFFFF << 32) | value))
        return 3, text.upper() if draw(st.booleans()) else text
    parts = draw(st.integers(1, 4))
    bases = draw(st.lists(st.sampled_from([8, 10, 16]), min_size=parts, max_size=parts))
    text = _aton_spelling(value, parts, bases, draw(st.booleans()))
    return 3, text + "." if draw(st.booleans()) else text


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    targets=st.lists(spellings(), min_size=1, max_size=6),
    form=st.sampled_from(sorted(RULE_FORMS)),
)
def test_generated_spellings_of_denied_networks_are_denied(
    targets: list[tuple[int, str]], form: str, store: Store, db_path: Path
) -> None:
    """Whatever spelling of a denied address: CONNECT gets REP 02 and a datagram is dropped."""
    for atyp, text in targets:  # the generator itself: each is this host to the resolver too
        if atyp == 3 and not text.endswith("."):
            address = resolver_numeric(text)
            assert address is not None and judged(address)[-1].is_loopback, text

    async def scenario() -> None:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                denied = await start_udp_echo(nursery, "127.0.0.1")
                allowed = await start_udp_echo(nursery, "127.0.0.1")
                rules = parse_rules([{"id": RULE_ID, "action": "deny", "to": RULE_FORMS[form],
                                      "ports": [denied[1]]}])
                config = make_config(db_path, rules=rules)
                ctx = await nursery.start(serve_with_admin, config, store)
                address = ctx.listening[0][:2]
                for atyp, text in targets:
                    rep = await reply_to(address, request(1, atyp, text, denied[1]))
                    assert rep == 2, text
                await udp_drops(address, targets, denied[1], allowed[1])
                assert ctx.stats.udp_dropped["not_allowed"] == len(targets)
                ctx.shutdown.set()
                nursery.cancel_scope.cancel()

    trio.run(scenario)
