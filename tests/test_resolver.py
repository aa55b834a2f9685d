"""The resolver (``resolvers``, ``resolver_timeout``, ``resolver_cache_size``, ``hosts``)
against a DNS server written here with dnspython, on loopback, that counts what it is asked:
names the system resolver does not know, TTLs and negative answers kept as they say, a
truncated UDP answer asked again over TCP, the hosts table first, a silent server timing out,
and the same resolver for CONNECT, UDP ASSOCIATE, Tor's RESOLVE and after a reload."""

from __future__ import annotations

import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest
import trio

from tests.conftest import (
    Proxy,
    connect_request,
    read_reply,
    receive_exactly,
    socks_handshake,
)
from tests.test_udp import associate, atyp_addr, header, open_udp, start_udp_echo
from trisocks.admin.metrics import ProxyCollector
from trisocks.config import ConfigError, Endpoint
from trisocks.config.keys import KEYS
from trisocks.server.reload import reload_config

OPEN: dict[str, Any] = {"auth": ("none",)}
ZONE = "example."


@attrs.define
class FakeDns:
    """A DNS server on 127.0.0.1 (UDP and TCP on one port) answering from ``records``
    (name -> (addresses, TTL)); other names are NXDOMAIN, with an SOA whose minimum is
    ``negative_ttl``. Names in ``truncate`` get a truncated UDP answer (TC, nothing in it)
    and the real one over TCP. ``pointers`` answer PTR questions (reverse name -> (name,
    TTL)). ``asked`` counts (name, type, "udp"/"tcp")."""

    port: int = 0
    records: dict[str, tuple[list[str], int]] = attrs.Factory(dict)
    truncate: set[str] = attrs.Factory(set)
    pointers: dict[str, tuple[str, int]] = attrs.Factory(dict)
    negative_ttl: int = 60
    asked: Counter[tuple[str, str, str]] = attrs.Factory(Counter)

    def count(self, name: str, transport: str | None = None) -> int:
        return sum(n for (qname, _, how), n in self.asked.items()
                   if qname == name and transport in (None, how))

    def answer(self, wire: bytes, transport: str) -> bytes:
        query = dns.message.from_wire(wire)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True)
        kind = dns.rdatatype.to_text(question.rdtype)
        self.asked[(name, kind, transport)] += 1
        response = dns.message.make_response(query)
        soa = dns.rrset.from_text(ZONE, self.negative_ttl, "IN", "SOA",
                                  f"ns.{ZONE} admin.{ZONE} 1 60 60 60 {self.negative_ttl}")
        if kind == "PTR" and name in self.pointers:
            target, ttl = self.pointers[name]
            response.answer.append(dns.rrset.from_text(question.name, ttl, "IN", "PTR",
                                                       target + "."))
            return response.to_wire()
        if name not in self.records:
            response.set_rcode(dns.rcode.NXDOMAIN)
            response.authority.append(soa)
            return response.to_wire()
        if transport == "udp" and name in self.truncate:
            response.flags |= dns.flags.TC
            return response.to_wire()
        ips, ttl = self.records[name]
        family = [ip for ip in ips if (":" in ip) == (kind == "AAAA")]
        if family and kind in ("A", "AAAA"):
            response.answer.append(dns.rrset.from_text_list(question.name, ttl, "IN", kind,
                                                            family))
        else:  # NODATA, kept no longer than the name's own TTL here
            response.authority.append(dns.rrset.from_text(
                ZONE, ttl, "IN", "SOA", f"ns.{ZONE} admin.{ZONE} 1 60 60 60 {ttl}"))
        return response.to_wire()

    async def serve_udp(self, sock: trio.socket.SocketType) -> None:
        with sock:
            while True:
                wire, source = await sock.recvfrom(65535)
                await sock.sendto(self.answer(wire, "udp"), source)

    async def serve_tcp(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                while True:
                    size = int.from_bytes(await receive_exactly(stream, 2), "big")
                    reply = self.answer(await receive_exactly(stream, size), "tcp")
                    await stream.send_all(len(reply).to_bytes(2, "big") + reply)
            except (EOFError, trio.BrokenResourceError):
                pass


@pytest.fixture
async def fake_dns(nursery: trio.Nursery) -> FakeDns:
    server = FakeDns()
    for _ in range(50):  # a UDP port whose TCP twin is free too (another test may hold it)
        udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        await udp.bind(("127.0.0.1", 0))
        server.port = udp.getsockname()[1]
        tcp = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            await tcp.bind(("127.0.0.1", server.port))
            break
        except OSError:
            tcp.close()
            udp.close()
    else:
        pytest.fail("no port free for both UDP and TCP in 50 tries")
    tcp.listen(16)
    nursery.start_soon(server.serve_udp, udp)
    nursery.start_soon(trio.serve_listeners, server.serve_tcp, [trio.SocketListener(tcp)])
    return server


def using(dns_server: FakeDns, **overrides: Any) -> dict[str, Any]:
    return {**OPEN, "resolvers": (Endpoint("127.0.0.1", dns_server.port),), **overrides}


async def connect(proxy: Proxy, host: str, port: int) -> tuple[int, trio.SocketStream]:
    stream = await proxy.open_raw()
    await socks_handshake(stream, None)
    await stream.send_all(connect_request(host, port))
    rep, _, _ = await read_reply(stream)
    return rep, stream


async def connect_rep(proxy: Proxy, host: str, port: int) -> int:
    rep, stream = await connect(proxy, host, port)
    await stream.aclose()
    return rep


async def test_connect_to_a_name_only_the_test_dns_knows(
    start_proxy: Callable[..., Any], fake_dns: FakeDns, echo_server: tuple[str, int]
) -> None:
    fake_dns.records["only-in-test.example"] = (["127.0.0.1"], 300)
    proxy = await start_proxy(**using(fake_dns))
    with trio.fail_after(10):
        rep, stream = await connect(proxy, "only-in-test.example", echo_server[1])
        async with stream:
            assert rep == 0
            await stream.send_all(b"hello")
            assert await receive_exactly(stream, 5) == b"hello"
    assert fake_dns.asked == Counter({("only-in-test.example", "A", "udp"): 1,
                                      ("only-in-test.example", "AAAA", "udp"): 1})


async def test_answers_are_kept_for_their_ttl(
    start_proxy: Callable[..., Any], fake_dns: FakeDns, echo_server: tuple[str, int]
) -> None:
    fake_dns.records["short.example"] = (["127.0.0.1"], 1)
    proxy = await start_proxy(**using(fake_dns))
    with trio.fail_after(10):
        assert await connect_rep(proxy, "short.example", echo_server[1]) == 0
        assert await connect_rep(proxy, "SHORT.example.", echo_server[1]) == 0  # same name
        assert fake_dns.count("short.example") == 2  # A and AAAA, once
        await trio.sleep(1.2)  # the TTL is over
        assert await connect_rep(proxy, "short.example", echo_server[1]) == 0
        assert fake_dns.count("short.example") == 4
    metrics = {m.name: m for m in ProxyCollector(proxy.ctx).collect()}
    assert metrics["trisocks_dns_queries"].samples[0].value == 4  # /metrics counts them


async def test_nxdomain_is_rep_04_and_kept(
    start_proxy: Callable[..., Any], fake_dns: FakeDns
) -> None:
    proxy = await start_proxy(**using(fake_dns))
    with trio.fail_after(10):
        assert await connect_rep(proxy, "missing.example", 80) == 4
        asked = fake_dns.count("missing.example")
        assert 1 <= asked <= 2  # A and AAAA go out at once
        assert await connect_rep(proxy, "missing.example", 80) == 4
        assert fake_dns.count("missing.example") == asked  # the negative answer was kept


async def test_negative_answer_expires_with_the_soa_minimum(
    start_proxy: Callable[..., Any], fake_dns: FakeDns, echo_server: tuple[str, int]
) -> None:
    fake_dns.negative_ttl = 1
    proxy = await start_proxy(**using(fake_dns))
    with trio.fail_after(10):
        assert await connect_rep(proxy, "late.example", echo_server[1]) == 4
        fake_dns.records["late.example"] = (["127.0.0.1"], 60)  # the name is created
        assert await connect_rep(proxy, "late.example", echo_server[1]) == 4  # still kept
        await trio.sleep(1.2)
        assert await connect_rep(proxy, "late.example", echo_server[1]) == 0


async def test_truncated_udp_answer_is_asked_again_over_tcp(
    start_proxy: Callable[..., Any], fake_dns: FakeDns, echo_server: tuple[str, int]
) -> None:
    fake_dns.records["big.example"] = (["127.0.0.1"], 300)
    fake_dns.truncate.add("big.example")
    proxy = await start_proxy(**using(fake_dns))
    with trio.fail_after(10):
        assert await connect_rep(proxy, "big.example", echo_server[1]) == 0
    assert fake_dns.asked[("big.example", "A", "udp")] == 1
    assert fake_dns.asked[("big.example", "A", "tcp")] == 1


async def test_hosts_table_answers_without_a_query(
    start_proxy: Callable[..., Any], fake_dns: FakeDns, echo_server: tuple[str, int]
) -> None:
    fake_dns.records["static.example"] = (["127.0.0.9"], 300)  # the table wins over DNS
    hosts = KEYS["hosts"]("hosts", "static.example=127.0.0.1")
    proxy = await start_proxy(**using(fake_dns, hosts=hosts))
    with trio.fail_after(10):
        rep, stream = await connect(proxy, "Static.Example.", echo_server[1])
        async with stream:
            assert rep == 0
            await stream.send_all(b"x")
            assert await receive_exactly(stream, 1) == b"x"
    assert fake_dns.asked == Counter()


async def test_hosts_table_with_the_system_resolver(
    start_proxy: Callable[..., Any], echo_server: tuple[str, int]
) -> None:
    hosts = KEYS["hosts"]("hosts", {"only-in-table.example": ["127.0.0.1"]})
    proxy = await start_proxy(**OPEN, hosts=hosts)
    with trio.fail_after(10):
        assert await connect_rep(proxy, "only-in-table.example", echo_server[1]) == 0


async def test_silent_server_times_out_with_rep_04(
    start_proxy: Callable[..., Any], nursery: trio.Nursery
) -> None:
    silent = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # reads nothing, ever
    await silent.bind(("127.0.0.1", 0))
    with silent:
        resolvers = (Endpoint("127.0.0.1", silent.getsockname()[1]),)
        proxy = await start_proxy(**OPEN, resolvers=resolvers, resolver_timeout=1.0)
        with trio.fail_after(10):
            start = trio.current_time()
            assert await connect_rep(proxy, "never.example", 80) == 4
            assert 0.9 <= trio.current_time() - start < 2.5


async def test_udp_datagrams_to_a_name_use_the_resolver(
    start_proxy: Callable[..., Any], fake_dns: FakeDns, nursery: trio.Nursery
) -> None:
    fake_dns.records["udp.example"] = (["127.0.0.1"], 300)
    echo = await start_udp_echo(nursery, "127.0.0.1")
    proxy = await start_proxy(**using(fake_dns, auth=("password",)))  # as associate() logs in
    with trio.fail_after(10):
        control, relay = await associate(proxy)
        with await open_udp() as client:
            async with control:
                name = b"\x03\x0budp.example"
                await client.sendto(header(name, echo[1]) + b"dgram", relay)
                data, _ = await client.recvfrom(65536)
                assert data == header(atyp_addr(echo), echo[1]) + b"dgram"
    assert fake_dns.count("udp.example") == 2


async def test_udp_datagrams_to_a_name_follow_its_ttl(
    start_proxy: Callable[..., Any], fake_dns: FakeDns, nursery: trio.Nursery
) -> None:
    """With resolvers set the association keeps no name of its own: a short TTL is honoured
    for datagrams too (the system resolver's answers are kept 60 s by the association)."""
    fake_dns.records["udp-short.example"] = (["127.0.0.1"], 1)
    echo = await start_udp_echo(nursery, "127.0.0.1")
    proxy = await start_proxy(**using(fake_dns, auth=("password",)))
    with trio.fail_after(10):
        control, relay = await associate(proxy)
        with await open_udp() as client:
            async with control:
                name = b"\x03\x11udp-short.example"
                for _ in range(2):
                    await client.sendto(header(name, echo[1]) + b"dgram", relay)
                    assert (await client.recvfrom(65536))[0].endswith(b"dgram")
                assert fake_dns.count("udp-short.example") == 2  # A and AAAA, once
                await trio.sleep(1.2)  # the TTL is over
                await client.sendto(header(name, echo[1]) + b"dgram", relay)
                assert (await client.recvfrom(65536))[0].endswith(b"dgram")
                assert fake_dns.count("udp-short.example") == 4


async def test_tor_resolve_ptr_uses_hosts_then_the_resolver(
    start_proxy: Callable[..., Any], fake_dns: FakeDns
) -> None:
    fake_dns.pointers["9.0.0.127.in-addr.arpa"] = ("ptr-only.example", 300)
    proxy = await start_proxy(**using(fake_dns, hosts=(("pinned.example", ("127.0.0.8",)),)))

    async def reverse(ip: str) -> tuple[int, bytes]:
        stream = await proxy.open_raw()
        async with stream:
            await socks_handshake(stream, None)
            await stream.send_all(connect_request(ip, 0, cmd=0xF1))
            rep, address, _ = await read_reply(stream)
        return rep, address

    with trio.fail_after(10):
        assert await reverse("127.0.0.9") == (0, b"\x03\x10ptr-only.example")
        assert await reverse("127.0.0.9") == (0, b"\x03\x10ptr-only.example")
        assert fake_dns.count("9.0.0.127.in-addr.arpa") == 1  # kept for its TTL
        assert await reverse("127.0.0.8") == (0, b"\x03\x0epinned.example")  # hosts first
        assert fake_dns.count("8.0.0.127.in-addr.arpa") == 0
        assert (await reverse("127.0.0.7"))[0] == 4  # NXDOMAIN: host unreachable


async def test_tor_resolve_uses_the_resolver(
    start_proxy: Callable[..., Any], fake_dns: FakeDns
) -> None:
    fake_dns.records["tor.example"] = (["127.0.0.9", "::1"], 300)
    proxy = await start_proxy(**using(fake_dns))
    with trio.fail_after(10):
        stream = await proxy.open_raw()
        async with stream:
            await socks_handshake(stream, None)
            await stream.send_all(connect_request("tor.example", 0, cmd=0xF0))
            rep, address, _ = await read_reply(stream)
    assert (rep, address) == (0, b"\x01" + socket.inet_aton("127.0.0.9"))  # IPv4 first


async def test_reload_applies_new_resolvers_to_new_lookups(
    start_proxy: Callable[..., Any], fake_dns: FakeDns, echo_server: tuple[str, int]
) -> None:
    fake_dns.records["moved.example"] = (["127.0.0.1"], 300)
    proxy = await start_proxy(**OPEN)
    with trio.fail_after(10):
        assert await connect_rep(proxy, "moved.example", echo_server[1]) == 4  # system: no
        config = attrs.evolve(proxy.ctx.config,
                              resolvers=(Endpoint("127.0.0.1", fake_dns.port),))
        proxy.ctx.load_config = lambda: config
        reload_config(proxy.ctx)
        assert await connect_rep(proxy, "moved.example", echo_server[1]) == 0


async def test_two_servers_in_one_process_keep_their_own_resolver(
    start_proxy: Callable[..., Any], fake_dns: FakeDns, echo_server: tuple[str, int]
) -> None:
    fake_dns.records["mine.example"] = (["127.0.0.1"], 300)
    with_dns = await start_proxy(**using(fake_dns))
    without = await start_proxy(**OPEN)
    with trio.fail_after(10):
        assert await connect_rep(with_dns, "mine.example", echo_server[1]) == 0
        assert await connect_rep(without, "mine.example", echo_server[1]) == 4


# --- the keys --------------------------------------------------------------------------------


def test_resolvers_key() -> None:
    parse = KEYS["resolvers"]
    assert parse("resolvers", "10.0.0.53, 10.0.0.54:5353,[::1]:53,2001:db8::1") == (
        Endpoint("10.0.0.53", 53), Endpoint("10.0.0.54", 5353), Endpoint("::1", 53),
        Endpoint("2001:db8::1", 53))
    assert parse("resolvers", []) == ()
    for bad in ("dns.example", "dns.example:53", "10.0.0.1:0", "10.0.0.1:99999", ["10.0.0.1", 53]):
        with pytest.raises(ConfigError, match=r"^resolvers: "):
            parse("resolvers", bad)


def test_hosts_key() -> None:
    parse = KEYS["hosts"]
    assert parse("hosts", "B.example.=10.0.0.5,::1;a.example=10.0.0.6") == (
        ("a.example", ("10.0.0.6",)), ("b.example", ("10.0.0.5", "::1")))
    assert parse("hosts", {"bücher.example": ["10.0.0.7"]}) == (
        ("xn--bcher-kva.example", ("10.0.0.7",)),)
    for bad in ("a.example", "a.example=", "a.example=not-an-ip", {"a.example": "10.0.0.1"}):
        with pytest.raises(ConfigError, match=r"^hosts: "):
            parse("hosts", bad)
