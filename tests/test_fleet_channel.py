"""The local kill channel between workers: delivered from our uid, dropped from others."""

from __future__ import annotations

import os
import textwrap

import pytest
import trio

from trisocks.fleet.channel import Kill, LocalChannel
from trisocks.fleet.directory import Instance


async def test_local_kills_only_from_our_own_uid(caplog: pytest.LogCaptureFixture) -> None:
    if os.getuid() != 0:
        pytest.skip("sending as another uid needs root")
    channel = LocalChannel(f"test/{os.getpid()}")
    me = Instance("test", channel.address)
    kills: list[Kill] = []
    last = trio.Event()

    def on_kill(kill: Kill) -> None:
        kills.append(kill)
        if kill.session == "last":
            last.set()

    theirs = Kill("test", "abcd1234", "killed by nobody")
    async with trio.open_nursery() as nursery:
        await nursery.start(channel.run, on_kill)
        # Any local user can reach an abstract socket: here "nobody" (65534) tries.
        message, address = theirs.encode().encode(), "\0" + channel.address
        script = textwrap.dedent(f"""
            import socket
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto({message!r}, {address!r})
        """)
        await trio.run_process(["/usr/bin/python3", "-c", script], cwd="/",
                               user=65534, group=65534)
        await channel.send(me, Kill("test", "last", "killed by admin"))  # queued behind it
        with trio.fail_after(5):
            await last.wait()
        nursery.cancel_scope.cancel()
    assert [k.session for k in kills] == ["last"]
    assert "ignored a message from uid 65534" in caplog.text
