"""The dashboard (admin_ui) in a real browser: Debian's Chromium driven by Playwright.

The proxy, its admin API and the slow target server run in the test's trio loop. Playwright's
sync API runs in a worker thread (``trio.to_thread.run_sync``) and calls back into trio
(``trio.from_thread.run``) whenever the scenario needs the SOCKS side: opening a transfer,
waiting for the client to see its connection end.
"""

from __future__ import annotations

import contextlib
import functools
import re
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from playwright.sync_api import Page, expect, sync_playwright

from tests.conftest import PASSWORD, USER, Proxy, read_reply, socks_handshake
from trisocks.config import Endpoint
from trisocks.store.records import UsageDelta

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]
TOKEN = "dashboard-test-token"
SCREENSHOT = Path(__file__).parents[1] / "test-artifacts" / "dashboard.png"
CHUNK, PERIOD = 2048, 0.05  # the slow target sends 2 KiB every 50 ms (~40 KiB/s)
TIMEOUT_MS = 10_000
"""Every Playwright wait; bounds the worker thread, which trio cannot cancel."""
expect.set_options(timeout=TIMEOUT_MS)
UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}


async def _trickle(stream: trio.SocketStream) -> None:
    """The slow target: bytes forever, a little at a time, until the peer goes away."""
    try:
        while True:
            await stream.send_all(b"x" * CHUNK)
            await trio.sleep(PERIOD)
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


@attrs.define(eq=False)
class Transfer:
    """A SOCKS5 CONNECT to the slow target, read until the connection ends."""

    stream: trio.SocketStream
    received: int = 0
    ended: trio.Event = attrs.field(factory=trio.Event)

    @property
    def client(self) -> str:
        """The client address as the session records it (``host:port``)."""
        host, port = self.stream.socket.getsockname()[:2]
        return f"{host}:{port}"

    async def read(self) -> None:
        try:
            while chunk := await self.stream.receive_some(65536):
                self.received += len(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # a reset ends it as surely as EOF
        finally:
            self.ended.set()


async def open_transfer(
    proxy: Proxy, target: tuple[str, int], nursery: trio.Nursery, user: str, password: str
) -> Transfer:
    stream = await proxy.open_raw()
    await socks_handshake(stream, user, password)
    host, port = target
    #                       ver cmd  rsv ATYP=IPv4  DST.ADDR                 DST.PORT
    await stream.send_all(b"\x05\x01\x00\x01" + socket.inet_aton(host) + port.to_bytes(2, "big"))
    rep, _, _ = await read_reply(stream)
    assert rep == 0
    transfer = Transfer(stream)
    nursery.start_soon(transfer.read)
    return transfer


async def ends_within(transfer: Transfer, seconds: float) -> None:
    with trio.fail_after(seconds):
        await transfer.ended.wait()


def bytes_down(row: Any) -> float:
    """A session row's "Down" cell ("12.5 KiB") back to a number."""
    value, unit = row.locator("td.col-bytes_down").inner_text().split()
    return float(value) * UNITS[unit]


def wait_for_growth(read: Callable[[], float], timeout: float = 10) -> None:
    first = read()
    deadline = time.monotonic() + timeout
    while read() <= first:
        assert time.monotonic() < deadline, f"stayed at {first} for {timeout}s"
        time.sleep(0.2)


@contextlib.contextmanager
def open_page(chromium: Path, origin: str) -> Iterator[Page]:
    """The dashboard at *origin* in a fresh Chromium; on exit, checks that the page made no
    request to any other host (no CDN, no fonts, nothing)."""
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            hosts: set[str] = set()
            page.on("request", lambda r: hosts.add(urllib.parse.urlsplit(r.url).netloc))
            page.goto(f"http://{origin}/")
            yield page
            assert hosts == {origin}, f"requests to other hosts: {hosts - {origin}}"
        finally:
            browser.close()


def sign_in(page: Page, token: str) -> None:
    page.get_by_label("Admin token").fill(token)
    page.get_by_role("button", name="Sign in").click()


def session_row(page: Page, transfer: Transfer) -> Any:
    return page.locator("#sessions tbody tr:not([hidden])").filter(
        has=page.locator("td.col-client", has_text=re.compile(f"^{re.escape(transfer.client)}$"))
    )


@pytest.fixture
def chromium() -> Path:
    # A missing browser is a failure, not a skip: CI must not go green without running these.
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the browser tests need Debian's chromium package "
                    "(apt-get install chromium; scripts/test installs it when run as root)")
    return CHROMIUM


@pytest.mark.deadline(150)  # a browser scenario inside fail_after(90), after the page's own
async def test_dashboard_live_sessions_kill_and_user_management(
    start_proxy: Callable[..., Any], nursery: trio.Nursery, chromium: Path
) -> None:
    trickle = functools.partial(trio.serve_tcp, _trickle, 0, host="127.0.0.1")
    target = (await nursery.start(trickle))[0].socket.getsockname()[:2]
    proxy: Proxy = await start_proxy(admin=Endpoint("127.0.0.1", 0), admin_token=TOKEN)
    assert proxy.ctx.admin_address is not None
    origin = "{}:{}".format(*proxy.ctx.admin_address[:2])
    # A Kerberos identity with usage: listed with its source, managed only by ending sessions.
    proxy.ctx.store.add_usage([("gssapi:dave", UsageDelta(1, 10, 20, last_seen=time.time()))])

    transfers: list[Transfer] = []

    def transfer_as(user: str, password: str) -> Transfer:
        transfer = trio.from_thread.run(open_transfer, proxy, target, nursery, user, password)
        transfers.append(transfer)
        return transfer

    def scenario() -> None:
        with open_page(chromium, origin) as page:
            # A wrong token is refused (401) and the login form says so.
            sign_in(page, "not-the-token")
            expect(page.locator("#login-error")).to_contain_text("not accepted")
            sign_in(page, TOKEN)
            expect(page.locator("#live-text")).to_have_text("Live")
            assert TOKEN not in page.url

            # A slow transfer appears, and its byte count grows.
            doomed = transfer_as(USER, PASSWORD)
            survivor = transfer_as(USER, PASSWORD)
            row = session_row(page, doomed)
            expect(row).to_have_count(1)
            expect(row.locator("td.col-user")).to_have_text(USER)
            expect(row.locator("td.col-target")).to_have_text(f"{target[0]}:{target[1]}")
            expect(row.locator("td.col-state")).to_have_text("relaying")
            expect(row.locator("td.col-protocol")).to_have_text("socks5")
            expect(row.locator("td.col-source")).to_have_text("store")
            wait_for_growth(lambda: bytes_down(row))
            ours = page.locator(f'#users tbody tr[data-user="{USER}"]')
            expect(ours.locator("td.col-source")).to_have_text("store")
            expect(ours.get_by_role("button")).to_have_count(3)
            dave = page.locator('#users tbody tr[data-user="gssapi:dave"]')
            expect(dave.locator("td.col-source")).to_have_text("gssapi")
            expect(dave.get_by_role("button")).to_have_text(["End sessions"])

            # Kill: confirm the dialog; the client's connection ends and the row leaves.
            page.once("dialog", lambda dialog: dialog.accept())
            row.get_by_role("button", name="Kill").click()
            trio.from_thread.run(ends_within, doomed, 2)
            expect(row).to_have_count(0)
            expect(session_row(page, survivor)).to_have_count(1)
            assert not survivor.ended.is_set()

            # A user added through the UI can authenticate through the proxy.
            form = page.locator("#add-user")
            form.get_by_label("User").fill("bob")
            form.get_by_label("Password").fill("bobs-password")
            form.get_by_role("button", name="Add user").click()
            expect(page.locator("#users tbody tr[data-user=bob]")).to_have_count(1)
            bob = transfer_as("bob", "bobs-password")
            bob_row = session_row(page, bob)
            expect(bob_row.locator("td.col-user")).to_have_text("bob")
            wait_for_growth(lambda: bytes_down(bob_row))

            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=SCREENSHOT, full_page=True)

    try:
        with trio.fail_after(90):
            await trio.to_thread.run_sync(scenario)
    finally:
        for transfer in transfers:
            await transfer.stream.aclose()


async def test_dashboard_reconnects_when_the_admin_server_comes_back(
    start_proxy: Callable[..., Any], chromium: Path
) -> None:
    first: Proxy = await start_proxy(admin=Endpoint("127.0.0.1", 0), admin_token=TOKEN)
    assert first.ctx.admin_address is not None
    host, port = first.ctx.admin_address[:2]

    async def restart() -> None:
        # The first server is gone once its port refuses connections; then take the same port.
        while True:
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError:
                break
            await stream.aclose()
            await trio.sleep(0.05)
        await start_proxy(admin=Endpoint(host, port), admin_token=TOKEN)

    def scenario() -> None:
        with open_page(chromium, f"{host}:{port}") as page:
            sign_in(page, TOKEN)
            expect(page.locator("#live-text")).to_have_text("Live")
            trio.from_thread.run_sync(first.ctx.shutdown.set)
            expect(page.locator("#banner")).to_contain_text("Connection to the proxy lost")
            expect(page.locator("#live-text")).to_have_text("Reconnecting…")
            trio.from_thread.run(restart)
            expect(page.locator("#banner")).to_be_hidden()
            expect(page.locator("#live-text")).to_have_text("Live")
            expect(page.locator("#dashboard")).to_be_visible()  # still signed in

    with trio.fail_after(60):
        await trio.to_thread.run_sync(scenario)
