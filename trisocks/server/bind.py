"""Placeholder until this command is implemented: answers REP 07."""

from __future__ import annotations

import trio

from trisocks.protocol import Reply, Request
from trisocks.server.common import send_reply
from trisocks.server.context import ServerContext
from trisocks.sessions import Session


async def handle_bind(
    stream: trio.SocketStream,
    session: Session,
    request: Request,
    leftover: bytes,
    ctx: ServerContext,
) -> None:
    await send_reply(stream, session, Reply.COMMAND_NOT_SUPPORTED)
