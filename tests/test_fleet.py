"""The fleet end to end: clients through HAProxy (send-proxy-v2) to trisocks, twice over:

- ``postgresql``: two ``trisocks serve`` instances on one PostgreSQL database;
- ``sqlite``: one ``trisocks serve --workers 2`` on an SQLite file (admin API in worker 0).

Either way a client is listed by every admin API with its real address, a session is killed
from an admin API of ANOTHER instance within a second, and the bytes of all sessions land in
the shared per-user totals. The programs are real (tests/fleet_support.py).
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio

from tests.admin_support import echo_round
from tests.conftest import PASSWORD, USER, eventually, open_connect, wait_closed
from tests.fleet_support import (
    TOKEN,
    Trisocks,
    pg_url,
    postgres,
    program,
    run_haproxy,
    run_trisocks,
)
from tests.test_proxy_protocol_server import _refused
from trisocks.net import format_sockaddr
from trisocks.passwords import hash_password
from trisocks.store.open import open_store

__all__ = ["pg_url", "postgres"]  # fixtures used by name

PAYLOAD = bytes(range(256)) * 256  # 64 KiB each way per client
KILL_WITHIN = 1.0


@attrs.frozen
class Fleet:
    socks: tuple[str, int]
    """HAProxy's frontend."""
    instances: list[Trisocks]


def _add_user(db: str) -> None:
    store = open_store(db)
    try:
        store.add_user(USER, hash_password(PASSWORD.encode()))
    finally:
        store.close()


@pytest.fixture(params=["postgresql", "sqlite"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Fleet]:
    with contextlib.ExitStack() as stack:
        if request.param == "postgresql":
            db = request.getfixturevalue("pg_url")
            _add_user(db)
            instances = [stack.enter_context(run_trisocks(tmp_path, db)) for _ in range(2)]
        else:
            db = str(tmp_path / "fleet.db")
            _add_user(db)
            instances = [stack.enter_context(run_trisocks(tmp_path, db, workers=2))]
        port = stack.enter_context(run_haproxy([t.port for t in instances]))
        yield Fleet(("127.0.0.1", port), instances)


@contextlib.asynccontextmanager
async def open_admins(fleet: Fleet) -> AsyncIterator[list[httpx.AsyncClient]]:
    async with contextlib.AsyncExitStack() as stack:
        yield [await stack.enter_async_context(httpx.AsyncClient(
            base_url=t.admin_url, headers={"Authorization": f"Bearer {TOKEN}"}))
            for t in fleet.instances]


async def _listed(api: httpx.AsyncClient, clients: set[str]) -> list[dict[str, Any]] | None:
    """The relaying sessions of *clients*, once *api* lists them all."""
    sessions = (await api.get("/api/sessions")).json()["sessions"]
    mine = [s for s in sessions if s["client"] in clients and s["state"] == "relaying"]
    return mine if len(mine) == len(clients) else None


async def test_through_haproxy_listed_killed_from_another_instance_and_accounted(
    fleet: Fleet, echo_server: tuple[str, int]
) -> None:
    with trio.fail_after(60):
        async with open_admins(fleet) as admins, contextlib.AsyncExitStack() as clients:
            streams: dict[str, trio.SocketStream] = {}
            # Open sessions until two instances serve some (HAProxy alternates between two
            # instances; the kernel's SO_REUSEPORT hash spreads them between two workers).
            while True:
                stream = await clients.enter_async_context(
                    await open_connect(fleet.socks, echo_server))
                await echo_round(stream, PAYLOAD)
                streams[format_sockaddr(stream.socket.getsockname())] = stream
                for api in admins:  # fleet-wide, with the client's real address
                    listed = await eventually(lambda api=api: _listed(api, set(streams)), limit=60)
                if len({s["instance"] for s in listed}) == 2 or len(streams) == 32:
                    break
            assert len({s["instance"] for s in listed}) == 2, listed

            for api in admins:
                own = (await api.get("/api/stats")).json()["instance"]
                victim = next(s for s in listed if s["instance"] != own)
                listed.remove(victim)
                start = trio.current_time()
                response = await api.delete(f"/api/sessions/{victim['id']}")
                assert response.status_code == 204, response.text
                with trio.fail_after(KILL_WITHIN):
                    await wait_closed(streams[victim["client"]])
                assert trio.current_time() - start < KILL_WITHIN

            for session in listed:  # the others end normally
                stream = streams[session["client"]]
                await stream.send_eof()
                await wait_closed(stream)

        moved = len(streams) * len(PAYLOAD)
        async with open_admins(fleet) as admins:
            for api in admins:
                async def accounted(api: httpx.AsyncClient = api) -> bool:
                    usage = (await api.get(f"/api/users/{USER}")).json()
                    return (usage["bytes_up"], usage["bytes_down"], usage["sessions_total"]) == (
                        moved, moved, len(streams))
                await eventually(accounted, limit=60)

        for instance in fleet.instances:  # bypassing HAProxy: no PROXY header, no service
            async with await trio.open_tcp_stream("127.0.0.1", instance.port) as direct:
                await direct.send_all(b"\x05\x01\x02")
                assert await _refused(direct)


def test_deploy_haproxy_config_is_valid() -> None:
    """deploy/haproxy.cfg passes HAProxy's own check (its server names need not resolve)."""
    config = Path(__file__).parent.parent / "deploy" / "haproxy.cfg"
    result = subprocess.run([program("haproxy", "haproxy"), "-c", "-f", str(config)],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_missing_program_fails_naming_its_package() -> None:
    with pytest.raises(pytest.fail.Exception, match="apt-get install no-such-package"):
        program("trisocks-no-such-program", "no-such-package")
