"""Real HTTP proxy clients through trisocks' HTTP proxy: curl (forwarding and CONNECT), httpx,
requests, pip, git (dumb HTTP), apt-get, ncat and Chromium.

Each test checks the content by hash and finds the session in the access log (so a client
that quietly went direct to the loopback origin fails)."""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import BLOB, PASSWORD, USER, Proxy, eventually
from tests.http_support import Origin, route_http, start_origin

pytestmark = pytest.mark.interop

CLEAN_ENV = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def program(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/test installs it with apt-get)")
    return path


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def run(argv: list[str], cwd: Path | None = None, stdin: bytes = b"") -> bytes:
    with trio.fail_after(60):
        result = await trio.run_process(
            argv, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False,
            env=CLEAN_ENV, cwd=cwd,
        )
    assert result.returncode == 0, (result.stdout + result.stderr).decode(errors="replace")
    return result.stdout


@pytest.fixture
def start_http(start_proxy: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> Any:
    route_http(monkeypatch)
    return start_proxy


@pytest.fixture
async def hproxy(start_http: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> Proxy:
    caplog.set_level(logging.INFO, logger="trisocks.access")
    return await start_http()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "www"
    path.mkdir()
    (path / "blob").write_bytes(BLOB)
    return path


@pytest.fixture
async def origin(nursery: trio.Nursery, root: Path) -> Origin:
    return await start_origin(nursery, root)


def url(proxy: Proxy, auth: bool = True) -> str:
    return f"http://{USER}:{PASSWORD}@127.0.0.1:{proxy.port}" if auth else \
        f"http://127.0.0.1:{proxy.port}"


def sessions(caplog: pytest.LogCaptureFixture, origin: Origin) -> list[dict[str, Any]]:
    """Logged sessions that went to *origin*."""
    target = f"127.0.0.1:{origin.port}"
    return [r.session for r in caplog.records  # type: ignore[attr-defined]
            if r.name == "trisocks.access" and r.session["target"] == target]


async def logged(caplog: pytest.LogCaptureFixture, origin: Origin, user: str | None = USER,
                 min_down: int = 1) -> None:
    await eventually(lambda: any(s["user"] == user and s["bytes_down"] >= min_down
                                 for s in sessions(caplog, origin)), limit=5)


def via_proxy(origin: Origin) -> bool:
    return any(("via", "1.1 trisocks") in [(n.lower(), v) for n, v in head["headers"]]
               for head in origin.heads)


@pytest.mark.parametrize("path", ["/blob", "/chunked/blob"])
async def test_curl_forward(
    hproxy: Proxy, origin: Origin, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    out = await run([program("curl"), "-sSf", "-x", url(hproxy), origin.base + path])
    assert sha(out) == sha(BLOB)
    assert via_proxy(origin)
    await logged(caplog, origin, min_down=len(BLOB))


async def test_curl_tunnel(hproxy: Proxy, origin: Origin, caplog: pytest.LogCaptureFixture) -> None:
    out = await run([program("curl"), "-sSf", "-p", "-x", url(hproxy), origin.base + "/blob"])
    assert sha(out) == sha(BLOB)
    assert not via_proxy(origin)  # tunnelled: the origin saw curl's own request
    await logged(caplog, origin, min_down=len(BLOB))
    assert sessions(caplog, origin)[0]["reply"] == 0


async def test_curl_post_upload(hproxy: Proxy, origin: Origin, tmp_path: Path) -> None:
    upload = tmp_path / "up"
    upload.write_bytes(BLOB[: 3 * 1024 * 1024])
    out = await run([program("curl"), "-sSf", "-x", url(hproxy), "--data-binary",
                     f"@{upload}", origin.base + "/echo"])
    assert sha(out) == sha(upload.read_bytes())


async def test_httpx(hproxy: Proxy, origin: Origin, caplog: pytest.LogCaptureFixture) -> None:
    import httpx

    def fetch() -> list[bytes]:
        with httpx.Client(proxy=url(hproxy), trust_env=False) as client:
            return [client.get(origin.base + p, timeout=20).raise_for_status().content
                    for p in ("/blob", "/chunked/blob")]

    with trio.fail_after(30):
        bodies = await trio.to_thread.run_sync(fetch)
    assert [sha(b) for b in bodies] == [sha(BLOB)] * 2
    await logged(caplog, origin, min_down=2 * len(BLOB))  # one connection, kept alive


async def test_requests(hproxy: Proxy, origin: Origin, caplog: pytest.LogCaptureFixture) -> None:
    import requests

    def fetch() -> bytes:
        with requests.Session() as session:
            session.trust_env = False
            response = session.get(origin.base + "/blob", timeout=20,
                                   proxies={"http": url(hproxy), "https": url(hproxy)})
            response.raise_for_status()
            return response.content

    with trio.fail_after(30):
        body = await trio.to_thread.run_sync(fetch)
    assert sha(body) == sha(BLOB)
    await logged(caplog, origin, min_down=len(BLOB))


def build_wheel(where: Path) -> Path:
    """tinypkg 0.1, a pure-Python wheel written by hand (PEP 427)."""
    wheel = where / "tinypkg-0.1-py3-none-any.whl"
    files = {
        "tinypkg/__init__.py": b"VALUE = 42\n",
        "tinypkg-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tinypkg\nVersion: 0.1\n",
        "tinypkg-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
                                       b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }

    def digest(data: bytes) -> str:
        return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()

    record = "".join(f"{name},sha256={digest(data)},{len(data)}\n"
                     for name, data in files.items()) + "tinypkg-0.1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("tinypkg-0.1.dist-info/RECORD", record)
    return wheel


async def test_pip_download(
    hproxy: Proxy, origin: Origin, root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = root / "files"
    files.mkdir()
    wheel = build_wheel(files)
    digest = sha(wheel.read_bytes())
    (root / "simple" / "tinypkg").mkdir(parents=True)
    (root / "simple" / "index.html").write_text('<a href="tinypkg/">tinypkg</a>\n')
    (root / "simple" / "tinypkg" / "index.html").write_text(
        f'<a href="../../files/{wheel.name}#sha256={digest}">{wheel.name}</a>\n')
    origin.root = root
    dest = tmp_path / "dl"
    pip = str(Path(os.sys.executable).parent / "pip")  # type: ignore[attr-defined]
    await run([pip, "download", "--isolated", "--no-cache-dir", "--disable-pip-version-check",
               "--no-deps", "--proxy", url(hproxy), "--index-url", origin.base + "/simple/",
               "-d", str(dest), "tinypkg"])
    assert sha((dest / wheel.name).read_bytes()) == digest
    assert via_proxy(origin)
    await logged(caplog, origin)


async def test_git_clone_dumb_http(
    hproxy: Proxy, origin: Origin, root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    git = program("git")
    work, bare = tmp_path / "work", root / "repo.git"
    content = BLOB[:200_000]
    await run([git, "init", "-q", "-b", "main", str(work)])
    (work / "data.bin").write_bytes(content)
    ident = ["-c", "user.name=t", "-c", "user.email=t@example.invalid"]
    await run([git, *ident, "-C", str(work), "add", "data.bin"])
    await run([git, *ident, "-C", str(work), "commit", "-q", "-m", "one"])
    await run([git, "clone", "-q", "--bare", str(work), str(bare)])
    await run([git, "-C", str(bare), "update-server-info"])
    clone = tmp_path / "clone"
    await run([git, "-c", f"http.proxy={url(hproxy)}", "clone", "-q",
               f"{origin.base}/repo.git", str(clone)])
    assert sha((clone / "data.bin").read_bytes()) == sha(content)
    await logged(caplog, origin)


async def test_apt_get_download(
    hproxy: Proxy, origin: Origin, root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "usr" / "share" / "tinydeb").mkdir(parents=True)
    (pkg / "usr" / "share" / "tinydeb" / "data").write_bytes(BLOB[:100_000])
    (pkg / "DEBIAN" / "control").write_text(
        "Package: tinydeb\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.invalid>\n"
        "Description: a test package\n")
    repo = root / "apt"
    repo.mkdir()
    deb = repo / "tinydeb_1.0_all.deb"
    await run([program("dpkg-deb"), "--root-owner-group", "--build", str(pkg), str(deb)])
    packages = await run([program("dpkg-scanpackages"), "."], cwd=repo)
    (repo / "Packages").write_bytes(packages)
    state, cache = tmp_path / "state", tmp_path / "cache"
    for d in (state / "lists" / "partial", cache / "archives" / "partial"):
        d.mkdir(parents=True)
    (state / "status").write_text("")
    sources = tmp_path / "sources.list"
    sources.write_text(f"deb [trusted=yes] {origin.base}/apt/ ./\n")
    options = [
        "-o", f"Acquire::http::Proxy={url(hproxy)}", "-o", f"Dir::Etc::SourceList={sources}",
        "-o", "Dir::Etc::SourceParts=/nonexistent", "-o", f"Dir::State={state}",
        "-o", f"Dir::State::status={state / 'status'}", "-o", f"Dir::Cache={cache}",
        "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root",
        "-o", "Acquire::Languages=none", "-o", "Dir::Etc::Parts=/nonexistent",
    ]
    apt = program("apt-get")
    await run([apt, *options, "update"])
    out = tmp_path / "out"
    out.mkdir()
    await run([apt, *options, "download", "tinydeb"], cwd=out)
    assert sha((out / deb.name).read_bytes()) == sha(deb.read_bytes())
    assert via_proxy(origin)
    await logged(caplog, origin)


async def test_ncat_http_proxy(
    hproxy: Proxy, echo_server: tuple[str, int], caplog: pytest.LogCaptureFixture
) -> None:
    out = await run(
        [program("ncat"), "--proxy", f"127.0.0.1:{hproxy.port}", "--proxy-type", "http",
         "--proxy-auth", f"{USER}:{PASSWORD}", "-w", "5", echo_server[0], str(echo_server[1])],
        stdin=b"ping through ncat over http\n",
    )
    assert out == b"ping through ncat over http\n"
    target = f"127.0.0.1:{echo_server[1]}"
    await eventually(lambda: any(
        r.session["target"] == target  # type: ignore[attr-defined]
        for r in caplog.records if r.name == "trisocks.access"), limit=5)


@pytest.mark.browser
async def test_chromium_through_http_proxy(
    start_http: Callable[..., Any], origin: Origin, root: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Headless Chromium sends no proxy credentials without a prompt: a server with
    ``auth = ["none"]`` on loopback."""
    from playwright.sync_api import sync_playwright

    from tests.test_dashboard import CHROMIUM, CHROMIUM_ARGS

    caplog.set_level(logging.INFO, logger="trisocks.access")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing (scripts/test installs chromium)")
    page_html = b"<!doctype html><title>through trisocks</title><p>hello</p>\n"
    (root / "page.html").write_bytes(page_html)
    proxy = await start_http(auth=("none",))

    def browse() -> tuple[bytes, str]:
        args = [*CHROMIUM_ARGS, f"--proxy-server=http://127.0.0.1:{proxy.port}",
                "--proxy-bypass-list=<-loopback>"]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=args)
            try:
                page = browser.new_page()
                page.set_default_timeout(10_000)
                response = page.goto(origin.base + "/page.html")
                assert response is not None
                return response.body(), page.title()
            finally:
                browser.close()

    with trio.fail_after(60):
        body, title = await trio.to_thread.run_sync(browse)
    assert sha(body) == sha(page_html) and title == "through trisocks"
    assert via_proxy(origin)
    await logged(caplog, origin, user=None)


@pytest.mark.parametrize("tunnel", [False, True], ids=["forward", "tunnel"])
async def test_curl_https_proxy(
    start_http: Callable[..., Any], origin: Origin, tmp_path: Path,
    caplog: pytest.LogCaptureFixture, tunnel: bool,
) -> None:
    """curl to trisocks over TLS (``--proxy https://``) on a tls:// listener."""
    import trustme

    from tests.test_tls import TLS_LISTEN, issue_server_files

    caplog.set_level(logging.INFO, logger="trisocks.access")
    ca = trustme.CA()
    cert, key = issue_server_files(ca, tmp_path)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    proxy = await start_http(listen=TLS_LISTEN, tls_cert=cert, tls_key=key)
    out = await run([program("curl"), "-sSf", *(["-p"] if tunnel else []),
                     "--proxy", f"https://127.0.0.1:{proxy.port}", "--proxy-cacert", str(ca_file),
                     "--proxy-user", f"{USER}:{PASSWORD}", origin.base + "/blob"])
    assert sha(out) == sha(BLOB)
    await logged(caplog, origin, min_down=len(BLOB))
    assert sessions(caplog, origin)[0]["protocol"] == ("http-connect" if tunnel else "http")
