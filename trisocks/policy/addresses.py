"""Which address a destination really is, and which addresses are this host's own.

Rules of this module (pure functions, except :func:`host_networks`, which asks the OS):

1. A destination is judged on the address the kernel reaches. An IPv4-mapped
   (``::ffff:a.b.c.d``) or IPv4-compatible (``::a.b.c.d``) IPv6 address *is* the IPv4 address
   (:func:`canonical`), for judging and for dialing.
2. ``0.0.0.0/8`` and ``::`` are "this host": Linux connects ``0.0.0.0`` to ``127.0.0.1`` and
   ``::`` to ``::1``. Such an address is judged twice, as itself and as the loopback address
   (:func:`judged`); both must be allowed. ``0.0.0.0`` and ``::`` are dialed as the loopback
   address (:func:`reached`), so the proxy never connects to what it did not judge.
3. A DOMAINNAME the resolver would take as a number is that address (:func:`numeric_host`):
   ``0``, ``127.1``, ``2130706433``, ``0x7f.0.0.1``, ``017.0.0.1`` (octal), IPv6 text, each with
   or without one trailing dot. It is judged and dialed as the address, never sent to DNS.
4. :data:`LOCAL_NETWORKS` (loopback and unspecified) plus every address on the host's
   interfaces (:func:`host_networks`) make ``@local``, "the proxy host itself".
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import ipaddress
import logging
import re
import socket
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "LOCAL_NETWORKS",
    "canonical",
    "host_networks",
    "judged",
    "numeric_host",
    "parse_fib_trie",
    "parse_if_inet6",
    "reached",
]

log = logging.getLogger("trisocks.policy")

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

LOOPBACK4 = ipaddress.IPv4Address("127.0.0.1")
LOOPBACK6 = ipaddress.IPv6Address("::1")
THIS_HOST4 = ipaddress.IPv4Network("0.0.0.0/8")
UNSPECIFIED6 = ipaddress.IPv6Address("::")
LOCAL_NETWORKS: tuple[Network, ...] = (
    ipaddress.IPv4Network("127.0.0.0/8"),
    ipaddress.IPv6Network("::1/128"),
    THIS_HOST4,
    ipaddress.IPv6Network("::/128"),
)
"""Always this host, whatever the interfaces say."""


@functools.lru_cache(maxsize=4096)
def canonical(ip: IP) -> IP:
    """*ip* without its zone, and an IPv4 address in IPv6 clothing (mapped ``::ffff:0:0/96`` or
    compatible ``::/96`` other than ``::`` and ``::1``) as the IPv4 address (rule 1)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    if ip.scope_id is not None:
        ip = ipaddress.IPv6Address(int(ip))
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    value = int(ip)
    if 1 < value < 1 << 32:
        return ipaddress.IPv4Address(value)
    return ip


@functools.lru_cache(maxsize=4096)
def judged(ip: IP) -> tuple[IP, ...]:
    """The addresses the rules see for a destination *ip* (rule 2): its canonical form, and for
    "this host" also the loopback address the kernel connects it to."""
    ip = canonical(ip)
    if isinstance(ip, ipaddress.IPv4Address):
        return (ip, LOOPBACK4) if ip in THIS_HOST4 else (ip,)
    return (ip, LOOPBACK6) if ip == UNSPECIFIED6 else (ip,)


@functools.lru_cache(maxsize=4096)
def reached(ip: IP) -> IP:
    """The address to dial for a destination *ip*: canonical, and ``0.0.0.0`` / ``::`` as the
    loopback address (rule 2). An IPv6 address keeps its zone (link-local needs one)."""
    base = canonical(ip)
    if base.is_unspecified:
        return LOOPBACK4 if base.version == 4 else LOOPBACK6
    return base if base.version != ip.version else ip


_PART = re.compile(r"0[xX][0-9a-fA-F]+|0[0-7]*|[1-9][0-9]*")


def _inet_aton(text: str) -> ipaddress.IPv4Address | None:
    """glibc's ``inet_aton`` as ``getaddrinfo`` applies it (exactly: no trailing text):
    1 to 4 dot-separated numbers, each decimal, octal (leading 0) or hex (``0x``); the last fills
    the bytes that are left."""
    parts = text.split(".")
    if not 1 <= len(parts) <= 4 or not all(_PART.fullmatch(p) for p in parts):
        return None
    values = [int(p, 16) if p[:2] in ("0x", "0X") else int(p, 8) if p[0] == "0" else int(p)
              for p in parts]
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (5 - len(values))):
        return None
    value = last
    for i, v in enumerate(head):
        value |= v << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


@functools.lru_cache(maxsize=4096)
def numeric_host(name: str) -> IP | None:
    """The address a DOMAINNAME spells, if it is a number to the resolver (rule 3), else
    ``None``. One trailing dot is ignored (``127.1.`` is ``127.0.0.1``)."""
    text = name[:-1] if name.endswith(".") else name
    if not text or not text.isascii() or len(text) > 255:
        return None
    if ":" in text:
        try:
            return ipaddress.IPv6Address(text)
        except ValueError:
            return None
    return _inet_aton(text)


# --- this host's addresses ---------------------------------------------------------------------


def parse_if_inet6(text: str) -> set[Network]:
    """The addresses in Linux's ``/proc/net/if_inet6`` (32 hex digits first on each line)."""
    found: set[Network] = set()
    for line in text.splitlines():
        fields = line.split()
        if fields and len(fields[0]) == 32:
            try:
                found.add(ipaddress.IPv6Network((int(fields[0], 16), 128)))
            except ValueError:
                continue
    return found


def parse_fib_trie(text: str) -> set[Network]:
    """The prefixes Linux's ``/proc/net/fib_trie`` routes to this host (``/N host LOCAL``
    under a ``|-- address`` line): each interface address, and whole local ranges
    (``ip route add local 10.9.0.0/16 dev lo``)."""
    found: set[Network] = set()
    address = None
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == "|--":
            address = fields[1]
        elif address and len(fields) >= 3 and fields[0].startswith("/") and fields[-1] == "LOCAL":
            try:
                found.add(ipaddress.IPv4Network(f"{address}{fields[0]}", strict=False))
            except ValueError:
                continue
    return found


class _Ifaddrs(ctypes.Structure):
    pass


_Ifaddrs._fields_ = [
    ("ifa_next", ctypes.POINTER(_Ifaddrs)),
    ("ifa_name", ctypes.c_char_p),
    ("ifa_flags", ctypes.c_uint),
    ("ifa_addr", ctypes.c_void_p),
    ("ifa_netmask", ctypes.c_void_p),
    ("ifa_ifu", ctypes.c_void_p),
    ("ifa_data", ctypes.c_void_p),
]


def _getifaddrs() -> set[Network]:
    """Every address on the interfaces, by ``getifaddrs(3)`` (Linux and the BSDs)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    head = ctypes.POINTER(_Ifaddrs)()
    if libc.getifaddrs(ctypes.byref(head)) != 0:
        raise OSError(ctypes.get_errno(), "getifaddrs failed")
    found: set[Network] = set()
    try:
        node = head
        while node:
            entry = node.contents
            if entry.ifa_addr:
                raw = ctypes.string_at(entry.ifa_addr, 24)
                # Linux: a native u16 family; the BSDs: a length byte, then a family byte.
                family = int.from_bytes(raw[:2], sys.byteorder) if sys.platform == "linux" \
                    else raw[1]
                if family == socket.AF_INET:
                    found.add(ipaddress.IPv4Network((raw[4:8], 32)))
                elif family == socket.AF_INET6:
                    found.add(ipaddress.IPv6Network((raw[8:24], 128)))
            node = entry.ifa_next
    finally:
        libc.freeifaddrs(head)
    return found


def host_networks(proc: Path = Path("/proc/net")) -> frozenset[Network]:
    """This host's own addresses now: :data:`LOCAL_NETWORKS`, ``getifaddrs``, and on Linux the
    kernel's local routes and IPv6 addresses from *proc*. A source that fails is logged and
    skipped; the others still count."""
    found: set[Network] = set(LOCAL_NETWORKS)
    sources: list[tuple[str, Callable[[], set[Network]]]] = [("getifaddrs", _getifaddrs)]
    if proc.is_dir():
        sources.append(("fib_trie", lambda: parse_fib_trie((proc / "fib_trie").read_text())))
        sources.append(("if_inet6", lambda: parse_if_inet6((proc / "if_inet6").read_text())))
    for name, source in sources:
        try:
            found |= source()
        except (OSError, AttributeError, ValueError) as exc:  # no libc symbol, no /proc file
            log.debug("local addresses: %s: %s", name, exc)
    return frozenset(found)
