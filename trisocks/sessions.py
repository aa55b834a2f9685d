"""Live sessions: one record and one cancel scope per client connection.

Invariants:

1. A session is in the registry exactly while its handler runs (``track`` adds and removes it).
2. Killing a session is cancelling its scope: every socket it opened is closed by the handler's
   own ``async with``/``finally`` blocks as the cancellation unwinds them.
3. Counters only grow. Accounting takes the difference since its last flush (``flushed``), so
   a byte is persisted exactly once whether the session is still running or has ended.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterator
from types import TracebackType
from typing import Any

import attrs
import trio

from trisocks.net import IP, ip_of
from trisocks.protocol import Address, Command

__all__ = ["COMMAND_NAMES", "PROTOCOLS", "STATES", "Counters", "Session", "SessionRegistry",
           "SessionView"]

STATES = ("handshake", "connecting", "relaying", "closing")
COMMAND_NAMES = {Command.CONNECT: "CONNECT", Command.BIND: "BIND", Command.UDP_ASSOCIATE: "UDP",
                 Command.RESOLVE: "RESOLVE", Command.RESOLVE_PTR: "RESOLVE_PTR"}
"""How the API, the access log and the directory name each command."""
COMMANDS_BY_NAME = {name: command for command, name in COMMAND_NAMES.items()}
PROTOCOLS = ("socks5", "socks4", "http-connect", "http")
"""What :attr:`Session.protocol` may be."""


@attrs.define(eq=False)
class Counters:
    """Payload bytes and datagrams moved, each direction (up: client -> target)."""

    bytes_up: int = 0
    bytes_down: int = 0
    datagrams_up: int = 0
    datagrams_down: int = 0


@attrs.define(eq=False)
class Session:
    """One client connection, from accept to close. Addresses and the command are kept parsed;
    :meth:`view` gives the frozen snapshot everything outside the handler reads (the API's JSON,
    the access log, the fleet directory, the event stream)."""

    id: str
    client: Address
    """The client's address and port (behind a PROXY protocol balancer: the real client's)."""
    started_at: float = attrs.field(factory=time.time)
    """Wall-clock start (seconds since the epoch)."""
    user: str | None = None
    """The account name (:func:`trisocks.identity.model.account_name`): the bare name for the
    store, ``source:name`` for any other source; ``None`` when anonymous."""
    source: str | None = None
    """Which source vouched for :attr:`user` (``store``, ``pam``, ``ldap``, ``http``,
    ``gssapi``, ``tls``); ``None`` when anonymous."""
    groups: frozenset[str] = frozenset()
    """Groups the source gave the identity, matched by rules' ``@group`` together with the
    config's ``groups`` table."""
    command: Command | None = None
    """Set once the request is read."""
    target: Address | None = None
    """What the client asked for (a name stays a name)."""
    resolved: Address | None = None
    """The address actually used (for BIND: the peer that connected; for RESOLVE and
    RESOLVE_PTR: the answer, port 0)."""
    state: str = "handshake"
    reply: int | None = None
    """The REP code sent (the final one for BIND), or None if no reply was sent."""
    close_reason: str | None = None
    rule: str | None = None
    """Id of the access rule that decided the request (``default`` when none matched)."""
    protocol: str = "socks5"
    """How the client spoke: one of :data:`PROTOCOLS`."""
    tls: bool = False
    """The client connection is TLS (a ``tls://`` listener)."""
    userid: str | None = None
    """SOCKS4's USERID field, as sent (not authenticated: SOCKS4 has no password)."""
    instance: str | None = None
    """The fleet instance serving it (:mod:`trisocks.fleet`); ``None`` outside a fleet."""
    parent: str | None = None
    """The ``via`` parent its connection went through, by label (``socks5://host:port``, no
    credentials: :mod:`trisocks.server.parents`); ``None``: direct."""
    egress: IP | None = None
    """The source address its traffic left from, when its rule gives ``egress``
    (:mod:`trisocks.server.egress`; the host's default after a ``fallback``); ``None``: no
    egress, the kernel's choice."""
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    counters: Counters = attrs.field(factory=Counters)
    flushed: Counters = attrs.field(factory=Counters)
    """What accounting has already taken of ``counters``."""

    @property
    def client_ip(self) -> IP:
        """The client's IP, comparable across families (:func:`trisocks.net.ip_of`)."""
        return ip_of(self.client.host)

    def kill(self, reason: str = "killed") -> None:
        if self.close_reason is None:
            self.close_reason = reason
        self.scope.cancel()

    def view(self) -> SessionView:
        c = self.counters
        return SessionView(
            self.id, self.user, self.client, self.command, self.target, self.resolved,
            self.protocol, self.tls, self.state, self.started_at, c.bytes_up, c.bytes_down,
            c.datagrams_up, c.datagrams_down, self.instance, self.reply, self.rule, self.userid,
            self.close_reason, self.source,
            egress=self.egress,
            parent=self.parent,
        )


@attrs.frozen
class SessionView:
    """A session as it is at one moment, for whatever is not its handler: the admin API's
    JSON (:func:`trisocks.admin.shapes.session_json`), the access log, the fleet directory
    (another instance's sessions are views too) and the event stream, which sends a session
    again when its view changed."""

    id: str
    user: str | None
    client: Address
    command: Command | None
    target: Address | None
    resolved: Address | None
    protocol: str
    tls: bool
    state: str
    started_at: float
    bytes_up: int
    bytes_down: int
    datagrams_up: int
    datagrams_down: int
    instance: str | None
    reply: int | None = None
    rule: str | None = None
    userid: str | None = None
    close_reason: str | None = None
    source: str | None = None
    """Which source vouched for ``user`` (:attr:`Session.source`)."""
    egress: IP | None = None
    """Where its traffic left from (:attr:`Session.egress`)."""
    parent: str | None = None
    """The upstream proxy it went through (:attr:`Session.parent`)."""

    @property
    def command_name(self) -> str | None:
        return None if self.command is None else COMMAND_NAMES[self.command]

    @property
    def client_ip(self) -> IP:
        return ip_of(self.client.host)

    def text(self) -> dict[str, Any]:
        """Every field, JSON-ready: addresses as ``host:port`` (``[v6]:port``), the command by
        name (:data:`COMMAND_NAMES`)."""
        fields = attrs.asdict(self, recurse=False)
        for key in ("client", "target", "resolved", "egress"):
            if fields[key] is not None:
                fields[key] = str(fields[key])
        fields["command"] = self.command_name
        return fields


Listener = Callable[[str, Session], None]
"""Called with ("start" | "state" | "end", session)."""


class SessionRegistry:
    """The live sessions of this process, by id."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}
        self._listeners: list[Listener] = []
        self._end_hooks: list[Callable[[Session], None]] = []
        self.total = 0
        """Sessions started since the process began."""
        self.instance: str | None = None
        """Stamped on new sessions: this process's fleet instance id, once it has one."""

    def __len__(self) -> int:
        return len(self._sessions)

    def __iter__(self) -> Iterator[Session]:
        return iter(list(self._sessions.values()))

    def get(self, session_id: str) -> Session | None:
        return self._sessions.get(session_id)

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def on_end(self, hook: Callable[[Session], None]) -> None:
        """Call *hook* with each session as it ends (before the listeners hear ``end``): for
        what a session holds until its end, without a call on every other event."""
        self._end_hooks.append(hook)

    def remove_listener(self, listener: Listener) -> None:
        self._listeners.remove(listener)

    def notify(self, event: str, session: Session) -> None:
        for listener in self._listeners:
            listener(event, session)

    def set_state(self, session: Session, state: str) -> None:
        session.state = state
        self.notify("state", session)

    def _new_id(self) -> str:
        while (session_id := secrets.token_hex(4)) in self._sessions:
            pass
        return session_id

    def track(self, client: Address) -> _Tracked:
        """Register a session for the duration of a ``with`` block and run the block in its
        scope: ``with registry.track(client) as session: ...``."""
        return _Tracked(self, Session(self._new_id(), client, instance=self.instance))

    def _enter(self, session: Session) -> None:
        self._sessions[session.id] = session
        self.total += 1
        self.notify("start", session)

    def _leave(self, session: Session) -> None:
        del self._sessions[session.id]
        session.state = "closing"
        for hook in self._end_hooks:
            hook(session)
        self.notify("end", session)

    def kill(self, session_id: str, reason: str = "killed") -> bool:
        session = self._sessions.get(session_id)
        if session is None:
            return False
        session.kill(reason)
        return True

    def select(
        self, predicate: Callable[[Session], bool] = lambda s: True
    ) -> list[Session]:
        return [s for s in self._sessions.values() if predicate(s)]


class _Tracked:
    """The context manager :meth:`SessionRegistry.track` returns. A plain class (not a
    generator) because every live session holds one: it is the smallest way to pair the
    registry entry with the session's cancel scope."""

    __slots__ = ("_registry", "_session")

    def __init__(self, registry: SessionRegistry, session: Session) -> None:
        self._registry = registry
        self._session = session

    def __enter__(self) -> Session:
        self._registry._enter(self._session)
        try:
            self._session.scope.__enter__()
        except BaseException:
            self._registry._leave(self._session)
            raise
        return self._session

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        try:
            return self._session.scope.__exit__(exc_type, exc, tb)
        finally:
            self._registry._leave(self._session)
