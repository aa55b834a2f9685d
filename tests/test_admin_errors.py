"""The admin API answers bad input with 4xx and a failing store with 503, always as JSON
(issue 12, section 4), and sends its security headers on every answer."""

from __future__ import annotations

import errno
import json
import logging
import queue
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import psycopg
import psycopg_pool
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.admin_support import ADMIN, TOKEN, EventStream, admin_proxy, admin_url, api
from tests.conftest import USER, Proxy, make_config
from tests.test_admin_openapi import check
from trisocks.admin.app import SECURITY_HEADERS
from trisocks.admin.server import serve_with_admin
from trisocks.policy.quotas import LIMIT_FIELDS
from trisocks.store.records import StoreError
from trisocks.store.sqlite import Store

__all__ = ["admin_proxy", "api"]  # fixtures used by name

USERS, PASSWORD, LIMITS = "/api/users", f"/api/users/{USER}/password", f"/api/users/{USER}/limits"
BODY_ROUTES = [("POST", USERS), ("PUT", PASSWORD), ("PUT", LIMITS)]
JSON = {"Content-Type": "application/json"}


def assert_error(response: httpx.Response, status: int) -> str:
    """*response* is *status* with the error shape; returns the message."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == "application/json"
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    return body["error"]  # type: ignore[no-any-return]


# --- malformed bodies -----------------------------------------------------------------------

DEEP = b"[" * 50_000  # unclosed: 50,000 deep within the 64 KiB a body may have
MALFORMED: list[tuple[str, bytes, str]] = [
    ("invalid-utf8", b'{"password": "\xff\xfe"}', "not UTF-8"),
    ("encoded-surrogate", b'{"password": "\xed\xa0\x80"}', "not UTF-8"),
    ("latin1", '{"password": "pässword"}'.encode("latin-1"), "not UTF-8"),
    ("deep-arrays", DEEP, "nested more than"),
    ("deep-closed", b"[" * 30_000 + b"]" * 30_000, "nested more than"),
    ("deep-objects", b'{"":' * 15_000, "nested more than"),
    ("deep-mixed", b'[{"a":' * 9_000, "nested more than"),
    ("deep-in-field", b'{"password": ' + DEEP + b"}", "nested more than"),
    ("lone-surrogate", b'{"password": "\\ud800"}', "lone surrogate"),
    ("lone-low-surrogate", b'{"user": "a\\udfffb", "password": "x"}', "lone surrogate"),
    ("surrogate-key", b'{"\\udc00": 1}', "lone surrogate"),
    ("nan", b'{"password": NaN}', "NaN"),
    ("infinity", b'{"password": Infinity}', "Infinity"),
    ("minus-infinity", b'{"password": -Infinity}', "Infinity"),
    ("float-overflow", b'{"password": 1e999}', "out of range"),
    ("huge-int", b'{"password": ' + b"9" * 5000 + b"}", "out of range"),
    ("duplicate-key", b'{"password": "a", "password": "b"}', "duplicate key"),
    ("truncated", b'{"password": "a', "not valid JSON"),
    ("trailing-garbage", b'{"password": "a"} x', "not valid JSON"),
    ("empty", b"", "not valid JSON"),
    ("bom", b'\xef\xbb\xbf{"password": "a"}', "not valid JSON"),
    ("array", b"[1, 2]", "got an array"),
    ("string", b'"password"', "got a string"),
    ("number", b"7", "got a number"),
    ("null", b"null", "got null"),
    ("true", b"true", "got true"),
    ("unknown-field", b'{"colour": 1}', "colour: unknown field"),
]


@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
@pytest.mark.parametrize(("body", "message"), [(b, m) for _, b, m in MALFORMED],
                         ids=[name for name, _, _ in MALFORMED])
async def test_malformed_body_is_400(
    api: httpx.AsyncClient, method: str, path: str, body: bytes, message: str
) -> None:
    response = await api.request(method, path, content=body, headers=JSON)
    assert message in assert_error(response, 400)


@pytest.mark.parametrize(("method", "path", "body", "message"), [
    ("POST", USERS, {"password": "pw"}, "user: expected a string"),
    ("POST", USERS, {"user": "carol"}, "password: expected a string"),
    ("POST", USERS, {"user": ["carol"], "password": "pw"}, "user: expected a string"),
    ("POST", USERS, {"user": None, "password": "pw"}, "user: expected a string"),
    ("POST", USERS, {"user": "carol", "password": 12345}, "password: expected a string"),
    ("POST", USERS, {"user": "carol", "password": True}, "password: expected a string"),
    ("POST", USERS, {"user": "carol", "password": {"x": 1}}, "password: expected a string"),
    ("POST", USERS, {}, "user: expected a string"),
    ("PUT", PASSWORD, {}, "password: expected a string"),
    ("PUT", PASSWORD, {"password": None}, "password: expected a string"),
    ("PUT", PASSWORD, {"password": ["pw"]}, "password: expected a string"),
    ("PUT", PASSWORD, {"password": "é" * 128}, "must be 1..255 bytes"),
    ("PUT", LIMITS, {"quota_day": "10M"}, "quota_day: expected"),
    ("PUT", LIMITS, {"quota_day": 1.5}, "quota_day: expected"),
    ("PUT", LIMITS, {"quota_day": True}, "quota_day: expected"),
    ("PUT", LIMITS, {"quota_day": [1]}, "quota_day: expected"),
    ("PUT", LIMITS, {"quota_day": 10**30}, "quota_day: must be at most"),
    ("PUT", LIMITS, {"rate_up": 2**63}, "rate_up: must be at most"),
    ("PUT", LIMITS, {"max_session_duration": 1e308}, "max_session_duration: must be at most"),
    ("PUT", LIMITS, {"max_sessions": -1}, "max_sessions: must be greater than 0"),
    ("PUT", LIMITS, {"max_sessions": 0}, "max_sessions: must be greater than 0"),
])
async def test_wrong_types_and_missing_fields_are_400(
    api: httpx.AsyncClient, method: str, path: str, body: Any, message: str
) -> None:
    assert message in assert_error(await api.request(method, path, json=body), 400)


@pytest.mark.parametrize(("content_type", "message"), [
    ("text/plain", "must be application/json, not text/plain"),
    ("application/x-www-form-urlencoded", "not application/x-www-form-urlencoded"),
    ("multipart/form-data; boundary=x", "not multipart/form-data"),
    ("application/json; charset=latin-1", "must be UTF-8, not latin-1"),
    ("application/json; charset=utf-16", "must be UTF-8, not utf-16"),
])
@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
async def test_wrong_content_type_is_415(
    api: httpx.AsyncClient, method: str, path: str, content_type: str, message: str
) -> None:
    response = await api.request(method, path, content=b'{"password": "pw"}',
                                 headers={"Content-Type": content_type})
    assert message in assert_error(response, 415)


@pytest.mark.parametrize(("content_type", "status"), [
    (None, 204), ("application/json", 204), ("application/json; charset=UTF-8", 204),
    ("application/merge-patch+json", 204),
])
async def test_json_content_types_are_accepted(
    api: httpx.AsyncClient, content_type: str | None, status: int
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = await api.put(PASSWORD, content=b'{"password": "pw"}', headers=headers)
    assert response.status_code == status


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(data), 8192):
        yield data[start:start + 8192]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
@pytest.mark.parametrize(("method", "path"), BODY_ROUTES)
async def test_oversized_body_is_413(
    admin_proxy: Proxy, method: str, path: str, chunked: bool
) -> None:
    body = b'{"password": "' + b"p" * 100_000 + b'"}'
    async with httpx.AsyncClient(base_url=admin_url(admin_proxy),
                                 headers={"Authorization": f"Bearer {TOKEN}", **JSON}) as client:
        # An iterator: httpx sends it chunked, without a Content-Length.
        content: Any = _chunks(body) if chunked else body
        try:
            response = await client.request(method, path, content=content)
        except httpx.WriteError:  # the server may answer and close before reading it all
            pytest.skip("the server closed the connection before the body was sent")
    assert "the request body is over 65536 bytes" in assert_error(response, 413)


@pytest.mark.parametrize(("method", "path", "headers", "status"), [
    ("PUT", PASSWORD, {"Authorization": "Bearer wrong"}, 401),
    ("POST", "/api/sessions", {}, 405),
    ("PUT", "/api/users/nobody/password", {}, 404),
    ("PUT", LIMITS, {"Content-Type": "text/plain"}, 415),
])
async def test_early_answers_keep_the_connection_usable(
    api: httpx.AsyncClient, method: str, path: str, headers: dict[str, str], status: int
) -> None:
    """An answer given before the route reads the body must not leave the keep-alive
    connection stuck (Hypercorn could, while the body was still arriving)."""
    with trio.fail_after(30):
        for _ in range(25):
            response = await api.request(method, path, content=b'{"password": "pw"}',
                                         headers=headers)
            assert_error(response, status)
            assert (await api.put(PASSWORD, json={"password": ""})).status_code == 400


# --- query and path parameters --------------------------------------------------------------

@pytest.mark.parametrize(("query", "message"), [
    ("target_port=%C2%B2", "not a port number"),  # superscript two: isdigit() but not int()
    ("target_port=%D9%A3", "not a port number"),  # Arabic-Indic three
    ("target_port=" + "0" * 5000, "not a port number"),
    ("target_port=-1", "not a port number"),
    ("target_port=", "not a port number"),
    ("client=%FF%FE", "not an IP address"),
    ("client=10.0.0.0/33", "not an IP address"),
    ("command=%00", "is not one of"),
    ("user=a&user=b", "user: given more than once"),
    ("target_port=80&target_port=81", "target_port: given more than once"),
    ("%FF=1", "unknown filter"),
])
@pytest.mark.parametrize("method", ["GET", "DELETE"])
async def test_bad_query_parameters_are_400(
    api: httpx.AsyncClient, method: str, query: str, message: str
) -> None:
    response = await api.request(method, f"/api/sessions?{query}")
    assert message in assert_error(response, 400)


@pytest.mark.parametrize("segment", ["%FF", "%ED%A0%80", "%00", "%C0%AF", "a%0Ab", "x" * 5000,
                                     "%2E%2E", "(anonymous)"])
@pytest.mark.parametrize(("method", "template"), [
    ("GET", "/api/users/{}"), ("DELETE", "/api/users/{}"), ("GET", "/api/users/{}/limits"),
    ("DELETE", "/api/users/{}/sessions"), ("GET", "/api/sessions/{}"),
    ("DELETE", "/api/sessions/{}"),
])
async def test_odd_path_parameters_are_404(
    api: httpx.AsyncClient, method: str, template: str, segment: str
) -> None:
    response = await api.request(method, template.format(segment))
    if segment == "(anonymous)" and template == "/api/users/{}":
        assert response.status_code in (200, 404)  # anonymous usage is listed
        return
    assert_error(response, 404)


# --- store failures -------------------------------------------------------------------------

def _raiser(exc: BaseException) -> Callable[..., Any]:
    def fail(*_: Any, **__: Any) -> Any:
        raise exc
    return fail


FAILURES: list[tuple[BaseException, str]] = [
    (sqlite3.OperationalError("database is locked"), "store unavailable: database is locked"),
    (sqlite3.OperationalError("disk I/O error"), "store unavailable: disk I/O error"),
    (sqlite3.OperationalError("database or disk is full"),
     "store unavailable: database or disk is full"),
    (sqlite3.DatabaseError("database disk image is malformed"),
     "store unavailable: database disk image is malformed"),
    (sqlite3.ProgrammingError("Cannot operate on a closed database."),
     "store unavailable: Cannot operate on a closed database."),
    (StoreError("cannot open database /x/db: unable to open database file"),
     "store unavailable: cannot open database /x/db: unable to open database file"),
    (psycopg.OperationalError("consuming input failed: server closed the connection\nDETAIL"),
     "store unavailable: consuming input failed: server closed the connection"),
    (psycopg_pool.PoolTimeout("couldn't get a connection after 30.00 sec"),
     "store unavailable: couldn't get a connection after 30.00 sec"),
    (OSError(errno.ENOSPC, "No space left on device"), "unavailable: No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied"), "unavailable: Permission denied"),
    (ExceptionGroup("in a nursery", [sqlite3.OperationalError("disk I/O error")]),
     "store unavailable: disk I/O error"),
]


READS = [
    ("GET", f"/api/users/{USER}", None, "has_user"),
    ("GET", "/api/users", None, "read_all"),
    ("GET", "/metrics", None, "read_all"),
    ("GET", LIMITS, None, "user_limits"),
]
WRITES = [  # these methods raise StoreError for a duplicate or missing user: a 409 or 404
    ("POST", USERS, {"user": "dora", "password": "pw"}, "add_user"),
    ("PUT", PASSWORD, {"password": "pw"}, "set_password"),
    ("PUT", LIMITS, {"quota_day": 10}, "set_user_limits"),
    ("DELETE", f"/api/users/{USER}", None, "remove_user"),
]


@pytest.mark.parametrize(("method", "path", "body", "store_method", "exc", "message"), [
    pytest.param(*route, exc, message, id=f"{route[3]}-{type(exc).__name__}")
    for route in READS + WRITES for exc, message in FAILURES
    if not (route in WRITES and isinstance(exc, StoreError))
])
async def test_store_failure_is_503_naming_the_cause(
    admin_proxy: Proxy, api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
    method: str, path: str, body: Any, store_method: str, exc: BaseException, message: str,
) -> None:
    monkeypatch.setattr(admin_proxy.ctx.store, store_method, _raiser(exc))
    response = await api.request(method, path, json=body)
    assert assert_error(response, 503) == message
    monkeypatch.undo()
    assert (await api.request(method, path, json=body)).status_code < 400  # back when it is


@pytest.mark.parametrize(("method", "path", "body", "status"), [
    ("POST", USERS, {"user": "dora", "password": "pw"}, 201),
    ("PUT", PASSWORD, {"password": "pw"}, 204),
    ("PUT", LIMITS, {"quota_day": 10}, 200),
    ("DELETE", f"/api/users/{USER}", None, 204),
])
async def test_database_locked_by_another_connection_is_503(
    api: httpx.AsyncClient, db_path: Path, method: str, path: str, body: Any, status: int
) -> None:
    """A real lock: another connection (``trisocks user ...`` in a shell, say) holds the write
    lock longer than the store's busy timeout."""
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        with trio.fail_after(20):
            response = await api.request(method, path, json=body)
        assert assert_error(response, 503) == "store unavailable: database is locked"
        other.execute("ROLLBACK")
        with trio.fail_after(20):
            assert (await api.request(method, path, json=body)).status_code == status
    finally:
        other.close()


@pytest.mark.parametrize("exc", [RuntimeError("bug"), KeyError("bug"), ZeroDivisionError()],
                         ids=lambda v: type(v).__name__)
async def test_a_bug_is_a_json_500_with_the_traceback_in_the_log(
    admin_proxy: Proxy, api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture, exc: Exception,
) -> None:
    monkeypatch.setattr(admin_proxy.ctx.store, "has_user", _raiser(exc))
    with caplog.at_level(logging.ERROR, logger="trisocks.admin"):
        response = await api.get(f"/api/users/{USER}")
    assert assert_error(response, 500) == "internal error"
    (record,) = [r for r in caplog.records if r.name == "trisocks.admin"]
    assert record.exc_info is not None and record.exc_info[1] is exc


@pytest.mark.parametrize(("method", "path", "template", "kwargs"), [
    ("POST", USERS, USERS, {"content": b"\xff"}),
    ("POST", USERS, USERS, {"content": b"{}", "headers": {"Content-Type": "text/plain"}}),
    ("POST", USERS, USERS, {"content": b"[" * 70_000}),
    ("PUT", PASSWORD, "/api/users/{name}/password", {"content": b"NaN"}),
    ("PUT", LIMITS, "/api/users/{name}/limits", {"json": {"quota_day": 10**30}}),
    ("GET", "/api/sessions?user=a&user=b", "/api/sessions", {}),
    ("GET", f"/api/users/{USER}", "/api/users/{name}", {"fail": True}),
    ("GET", "/api/users", "/api/users", {"fail": True}),
    ("PUT", PASSWORD, "/api/users/{name}/password", {"json": {"password": "x"}, "fail": True}),
])
async def test_error_answers_are_documented(
    admin_proxy: Proxy, api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch,
    method: str, path: str, template: str, kwargs: dict[str, Any],
) -> None:
    if kwargs.pop("fail", False):
        for name in ("has_user", "read_all"):
            monkeypatch.setattr(admin_proxy.ctx.store, name,
                                _raiser(sqlite3.OperationalError("disk I/O error")))
    response = await api.request(method, path, **kwargs)
    assert response.status_code in (400, 413, 415, 503)
    check(response, template)


# --- security headers -----------------------------------------------------------------------

def assert_security_headers(headers: httpx.Headers) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert headers[name] == value, name
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]


async def test_security_headers_on_every_answer(
    admin_proxy: Proxy, api: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    answers = [await api.get(path) for path in
               ["/", "/index.html", "/app.js", "/style.css", "/favicon.svg", "/missing.js",
                "/healthz", "/metrics", "/api/stats", "/api/users", "/api/openapi.json",
                "/api/nothing-here", "/api/sessions?x=1"]]
    answers.append(await api.get("/api/stats", headers={"Authorization": "Bearer wrong"}))
    answers.append(await api.put("/api/sessions"))
    answers.append(await api.post(USERS, content=b"\xff", headers=JSON))
    answers.append(await api.delete("/api/sessions/nope"))
    monkeypatch.setattr(admin_proxy.ctx.store, "has_user",
                        _raiser(sqlite3.OperationalError("disk I/O error")))
    answers.append(await api.get(f"/api/users/{USER}"))
    monkeypatch.setattr(admin_proxy.ctx.store, "has_user", _raiser(RuntimeError("bug")))
    answers.append(await api.get(f"/api/users/{USER}"))
    # /index.html redirects to /.
    assert {r.status_code for r in answers} == {200, 308, 400, 401, 404, 405, 500, 503}
    for response in answers:
        assert_security_headers(response.headers)
    assert "<meta http-equiv" not in (await api.get("/")).text  # the header is the one source


async def test_security_headers_on_the_event_stream(admin_proxy: Proxy) -> None:
    with trio.fail_after(10):
        assert admin_proxy.ctx.admin_address is not None
        stream = await trio.open_tcp_stream(*admin_proxy.ctx.admin_address)
        async with stream:
            await stream.send_all(
                f"GET /api/events HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\r\n".encode())
            events = EventStream(stream)
            head = (await events._until(b"\r\n\r\n")).decode()
    status, *lines = head.split("\r\n")
    assert status.startswith("HTTP/1.1 200")
    assert_security_headers(httpx.Headers([line.split(": ", 1) for line in lines]))


# --- generated input ------------------------------------------------------------------------

@pytest.fixture
def threaded_admin(store: Store, db_path: Path) -> Iterator[httpx.Client]:
    """One proxy for every generated example: served by trio in a thread of its own, and
    reached with a blocking client from the (synchronous) Hypothesis test."""
    config = make_config(db_path, admin=ADMIN, admin_token=TOKEN)
    started: queue.Queue[Any] = queue.Queue()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            ctx = await nursery.start(serve_with_admin, config, store)
            started.put((ctx, trio.lowlevel.current_trio_token()))

    def run() -> None:
        try:
            trio.run(main)
        except BaseException as exc:
            started.put(exc)
            raise

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    result = started.get(timeout=30)
    if isinstance(result, BaseException):
        raise result
    ctx, trio_token = result
    host, port = ctx.admin_address
    try:
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=30,
                          headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            yield client
    finally:
        trio.from_thread.run_sync(ctx.shutdown.set, trio_token=trio_token)
        thread.join(timeout=30)
        assert not thread.is_alive()


ANY_CHAR = st.characters(codec=None, exclude_categories=())  # lone surrogates too
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(ANY_CHAR, max_size=20),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(ANY_CHAR, max_size=10), inner, max_size=4),
    max_leaves=20,
)
field_names = st.sampled_from(["user", "password", *LIMIT_FIELDS]) | st.text(ANY_CHAR, max_size=8)
objects = st.dictionaries(field_names, json_values, max_size=4)
bodies = st.one_of(
    st.binary(max_size=300),
    json_values.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    objects.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    # Valid JSON, then raw bytes: invalid UTF-8, truncations, junk.
    st.tuples(objects, st.binary(max_size=8), st.integers(0, 200)).map(
        lambda t: json.dumps(t[0], ensure_ascii=False).encode("utf-8", "surrogatepass")[:t[2]]
        + t[1]),
)
content_types = st.sampled_from([None, "application/json", "application/json; charset=utf-8",
                                 "text/plain", "application/json; charset=latin-1"])


def assert_json_answer(response: httpx.Response) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert set(response.json()) == {"error"}
    elif response.status_code != 204:
        assert isinstance(response.json(), dict)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(route=st.sampled_from(BODY_ROUTES), body=bodies, content_type=content_types)
def test_generated_bodies_never_fail_the_server(
    threaded_admin: httpx.Client, route: tuple[str, str], body: bytes, content_type: str | None
) -> None:
    method, path = route
    headers = {"Content-Type": content_type} if content_type else {}
    assert_json_answer(threaded_admin.request(method, path, content=body, headers=headers))


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    method=st.sampled_from(["GET", "DELETE"]),
    params=st.lists(st.tuples(
        st.sampled_from(["user", "command", "client", "target_host", "target_port"])
        | st.text(ANY_CHAR, max_size=6),
        st.text(ANY_CHAR, max_size=12) | st.integers().map(str)), max_size=4),
    segment=st.text(ANY_CHAR, min_size=1, max_size=30),
)
def test_generated_parameters_never_fail_the_server(
    threaded_admin: httpx.Client, method: str, params: list[tuple[str, str]], segment: str
) -> None:
    query = "&".join(f"{quote(k, safe='', errors='surrogatepass')}="
                     f"{quote(v, safe='', errors='surrogatepass')}" for k, v in params)
    assert_json_answer(threaded_admin.request(method, f"/api/sessions?{query}"))
    name = quote(segment, safe="", errors="surrogatepass")
    for path in (f"/api/users/{name}", f"/api/users/{name}/limits", f"/api/sessions/{name}"):
        assert_json_answer(threaded_admin.get(path))
