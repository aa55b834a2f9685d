"""CONNECT through a rule's ``via`` parents (:class:`trisocks.policy.routes.Parent`).

The parents are tried in the order listed. Each attempt has two steps:

1. *Reaching the parent*: the TCP connection, and for SOCKS5 the method negotiation and the
   RFC 1929 login, within ``via_timeout``. A parent that cannot be reached, refuses the login
   or breaks the protocol here is skipped, and marked down for ``via_down_for`` seconds: later
   sessions skip it while another parent of the list is up (when all are down, all are tried
   anyway, in order). An HTTP parent is reached the same way; its answer to ``CONNECT`` is
   step 2.
2. *The target*: the request for the target, within what is left of ``connect_timeout``. The
   parent's answer is the target's: a SOCKS REP failure (REP 05, connection refused, say) is
   what the client gets (:class:`trisocks.server.errors.UpstreamReply`), and the next parent is
   not tried. An HTTP parent's 403 is REP 02, 502 REP 04, 504 REP 06; any other status (407
   for a wrong password included) fails that parent, as a step-1 failure does.

``socks5h`` and ``http`` parents get the target as the client named it; a ``socks5`` parent
gets an address: the name is resolved here (:func:`trisocks.server.dial.resolve`), every
address judged by the rules like a direct CONNECT's, and the parent is asked for the first.
A name whose rule decision hangs on its addresses is resolved and judged here before its route
is known (:func:`trisocks.server.connect.dial_target`); then every parent kind gets the judged
address (:class:`Rerouted`).

The stream returned is the connection to the parent: a plain :class:`trio.SocketStream` when
nothing arrived beyond the parent's answer (so splice still relays it), or a
:class:`trisocks.client.SocksStream` holding those early bytes. The session records the
parent's label (:attr:`trisocks.sessions.Session.parent`) and, for an address it asked for,
:attr:`~trisocks.sessions.Session.resolved`; with a name the parent resolved, ``resolved``
stays unknown. The BND address a SOCKS client is told is this server's end of the connection to
the parent (the parent's own outbound address belongs to another host).
"""

from __future__ import annotations

import base64
import socket
from collections.abc import Callable, Iterable, Sequence

import h11
import trio

from trisocks.client import SocksAuthError, SocksProtocolError, SocksReplyError, SocksStream
from trisocks.client.handshake import Control, closed_on_error
from trisocks.net import ip_of
from trisocks.policy.addresses import reached
from trisocks.policy.routes import Parent
from trisocks.policy.rules import IP, Decision
from trisocks.protocol import Address, AddressType, Command, Reply
from trisocks.server.dial import Denied, Sources, connect_any, reach, resolve
from trisocks.server.egress import NoEgress
from trisocks.server.errors import UpstreamReply
from trisocks.server.stats import Stats
from trisocks.sessions import Session

__all__ = ["HTTP_STATUS_REPLIES", "ParentFailed", "Rerouted", "dial_via", "pick_order", "plain",
           "read_password"]

HTTP_STATUS_REPLIES = {403: Reply.NOT_ALLOWED, 502: Reply.HOST_UNREACHABLE,
                       504: Reply.TTL_EXPIRED}
"""An HTTP parent's answer to CONNECT that is the target's, as a SOCKS reply."""

MAX_HTTP_HEAD = 16384
"""An HTTP parent's response head longer than this fails the parent."""


class Rerouted(Exception):
    """A name's resolved addresses were judged, and the rule that allowed them routes through
    parents: connect through them (to *ips*, judged) instead of directly."""

    def __init__(self, ips: list[IP]) -> None:
        super().__init__("routed through parents")
        self.ips = ips


class ParentFailed(Exception):
    """This parent failed (step 1, or an HTTP status that is not the target's): try the next."""


def read_password(parent: Parent) -> str | None:
    """*parent*'s password: inline, or the first line of its ``password_file`` (read now, so a
    rotated file is used by the next connection).

    Raises:
        ParentFailed: the file cannot be read.
    """
    if parent.password_file is None:
        return parent.password
    try:
        lines = parent.password_file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeError) as exc:
        raise ParentFailed(f"password_file: {exc}") from None
    return lines[0] if lines else ""


def pick_order(via: Sequence[Parent], stats: Stats, now: float) -> list[Parent]:
    """The parents to try, in order: those not marked down; all of them when every one is."""
    up = [p for p in via if stats.parents_down.get(p.label, 0.0) <= now]
    return up or list(via)


PARENT_EYEBALLS_DELAY = 0.25
"""Seconds before the next address of a parent is tried (RFC 8305), with egress."""
SourcesFor = Callable[[Iterable[socket.AddressFamily]], Sources | None]
"""The rule's egress source per family of the parent's addresses (``None``: no egress)."""


async def reach_parent(parent: Parent, sources_for: SourcesFor | None) -> trio.SocketStream:
    """A TCP connection to *parent*, from the rule's egress address when it has one; a parent
    given by name is looked up like any target (``resolvers``, ``hosts``).

    Raises:
        OSError: the parent cannot be reached (``NoEgress``: no source of its family).
    """
    targets = await resolve(Address.of(parent.host, parent.port))
    if sources_for is None:
        return await connect_any(targets, PARENT_EYEBALLS_DELAY)
    sources = sources_for(family for family, _ in targets)
    if sources is not None:
        targets = [t for t in targets if t[0] in sources]
    return await connect_any(targets, PARENT_EYEBALLS_DELAY, sources)


async def _socks(
    parent: Parent, target: Address, via_timeout: float, sources_for: SourcesFor | None = None
) -> trio.SocketStream | SocksStream:
    password = read_password(parent)
    auth = None if parent.user is None else (parent.user, password or "")
    try:
        with trio.fail_after(via_timeout):
            stream = await reach_parent(parent, sources_for)
            control = Control(stream)
            async with closed_on_error(stream):
                await control.negotiate(auth)
    except NoEgress:
        raise  # the rule's doing, not the parent's: REP 03, the parent stays up
    except (OSError, trio.BrokenResourceError, trio.TooSlowError, SocksAuthError,
            SocksProtocolError) as exc:  # a reset shows as BrokenResourceError
        raise ParentFailed(str(exc) or type(exc).__name__) from None
    try:
        bound = await control.request(Command.CONNECT, target)
    except SocksReplyError as exc:
        control.stream.socket.close()
        raise UpstreamReply(int(exc.reply), f"{parent.label}: {exc}") from None
    except (OSError, trio.BrokenResourceError, SocksProtocolError) as exc:
        control.stream.socket.close()
        raise ParentFailed(str(exc)) from None
    except BaseException:
        control.stream.socket.close()
        raise
    return plain(control.stream, bytes(control.buffer), (bound.host, bound.port))


def plain(
    stream: trio.abc.Stream, early: bytes, bound: tuple[str, int]
) -> trio.SocketStream | SocksStream:
    """The plain socket stream when nothing came early (splice can relay it)."""
    if isinstance(stream, trio.SocketStream) and not early:
        return stream
    return SocksStream(stream, early, bound)  # type: ignore[arg-type]


def _http_request(parent: Parent, target: Address) -> h11.Request:
    """``CONNECT host:port`` (a non-ASCII name IDNA-encoded; ``[v6]:port``).

    Raises:
        socket.gaierror: the name cannot be IDNA-encoded (no parent could reach it).
    """
    if target.atyp == AddressType.DOMAIN and not target.host.isascii():
        try:
            authority = target.host.encode("idna") + b":%d" % target.port
        except UnicodeError:
            raise socket.gaierror(socket.EAI_NONAME, f"name cannot be IDNA-encoded: "
                                  f"{target.host!r}") from None
    else:
        authority = str(target).encode("ascii")
    headers = [(b"Host", authority)]
    if parent.user is not None:
        password = read_password(parent) or ""
        token = base64.b64encode(f"{parent.user}:{password}".encode())
        headers.append((b"Proxy-Authorization", b"Basic " + token))
    return h11.Request(method=b"CONNECT", target=authority, headers=headers)


async def _http(
    parent: Parent, target: Address, via_timeout: float, sources_for: SourcesFor | None = None
) -> trio.SocketStream | SocksStream:
    request = _http_request(parent, target)
    try:
        with trio.fail_after(via_timeout):
            stream = await reach_parent(parent, sources_for)
    except NoEgress:
        raise
    except (OSError, trio.TooSlowError) as exc:
        raise ParentFailed(str(exc) or type(exc).__name__) from None
    try:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HTTP_HEAD)
        await stream.send_all(conn.send(request) or b"")
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(4096)
                if not data:
                    raise ParentFailed("the parent closed the connection before answering")
                conn.receive_data(data)
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.Response):
                break
            else:
                raise ParentFailed(f"unexpected {type(event).__name__}")
        status = event.status_code
        if 200 <= status < 300:
            leftover, _ = conn.trailing_data
            local = stream.socket.getsockname()
            return plain(stream, bytes(leftover), (local[0], local[1]))
        if status in HTTP_STATUS_REPLIES:
            raise UpstreamReply(HTTP_STATUS_REPLIES[status], f"{parent.label}: http {status}")
        raise ParentFailed(f"http {status} {event.reason.decode('latin-1')}")
    except h11.ProtocolError as exc:
        stream.socket.close()
        raise ParentFailed(f"http: {exc}") from None
    except UpstreamReply:
        stream.socket.close()
        raise
    except (OSError, trio.BrokenResourceError) as exc:
        stream.socket.close()
        raise ParentFailed(str(exc) or type(exc).__name__) from None
    except BaseException:
        stream.socket.close()
        raise


async def _asked(
    parent: Parent, target: Address, judge: Callable[[list[IP]], Decision | None],
    ips: list[IP] | None,
) -> tuple[Address, Address | None]:
    """What *parent* is asked for, and the address that is (``None``: a name it resolves)."""
    if ips is not None:  # judged already (Rerouted)
        chosen = Address.of(str(reached(ips[0])), target.port)
        return chosen, chosen
    if target.atyp != AddressType.DOMAIN:
        return target, target
    if parent.resolves_names:
        return target, None
    targets = await resolve(target)
    denial = judge([ip_of(t[1][0]) for t in targets])
    if denial is not None:
        raise Denied(denial)
    first = reach(targets[0])[1]
    chosen = Address.of(first[0], target.port)
    return chosen, chosen


async def dial_via(
    session: Session, via: Sequence[Parent], target: Address,
    judge: Callable[[list[IP]], Decision | None], stats: Stats, via_timeout: float,
    down_for: float, ips: list[IP] | None = None, sources_for: SourcesFor | None = None,
) -> trio.SocketStream | SocksStream:
    """Connect to *target* through the first of *via* that works (module docstring); *judge*
    sees the addresses of a name resolved here, *ips* are a name's addresses judged already;
    *sources_for* gives the rule's egress addresses for the connection to the parent.

    Raises:
        Denied: a resolved address is denied.
        UpstreamReply: the parent's answer for the target (an OSError).
        OSError: the name does not resolve, or no parent could be used (REP 01).
    """
    failures: list[str] = []
    asked_by_kind: dict[bool, tuple[Address, Address | None]] = {}  # resolved once per kind
    for parent in pick_order(via, stats, trio.current_time()):
        if parent.resolves_names not in asked_by_kind:
            asked_by_kind[parent.resolves_names] = await _asked(parent, target, judge, ips)
        asked, resolved = asked_by_kind[parent.resolves_names]
        try:
            if parent.scheme == "http":
                stream = await _http(parent, asked, via_timeout, sources_for)
            else:
                stream = await _socks(parent, asked, via_timeout, sources_for)
        except ParentFailed as exc:
            stats.parent_failures[parent.label] += 1
            stats.parents_down[parent.label] = trio.current_time() + down_for
            failures.append(f"{parent.label}: {exc}")
            continue
        stats.parents_down.pop(parent.label, None)
        stats.parent_sessions[parent.label] += 1
        session.parent = parent.label
        session.resolved = resolved
        return stream
    raise OSError("no parent could be used: " + "; ".join(failures))
