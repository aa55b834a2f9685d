"""The authenticator's cache of verified passwords: fast for returning users, never a fast
"no" (the cost of a wrong password must not depend on who logged in recently)."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from trisocks.identity import store as auth
from trisocks.passwords import hash_password, verify_password


class OneUser:
    def __init__(self, name: str, password: bytes) -> None:
        self.hashes = {name: hash_password(password)}

    def password_hash(self, name: str) -> str | None:
        return self.hashes.get(name)


async def test_only_successes_skip_scrypt(monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[bytes] = []

    def counting_verify(password: bytes, stored: str) -> bool:
        checked.append(password)
        return verify_password(password, stored)

    monkeypatch.setattr(auth, "verify_password", counting_verify)
    store = OneUser("alice", b"right")
    authenticator = auth.Authenticator(store)  # type: ignore[arg-type]
    assert await authenticator.check(b"alice", b"right") == "alice"
    assert await authenticator.check(b"alice", b"right") == "alice"  # cached: no scrypt
    assert checked == [b"right"]
    assert await authenticator.check(b"alice", b"wrong") is None  # scrypt, like...
    assert await authenticator.check(b"nobody", b"wrong") is None  # ...an unknown user
    assert checked == [b"right", b"wrong", b"wrong"]
    store.hashes["alice"] = hash_password(b"new")  # changed elsewhere: the cache is stale
    assert await authenticator.check(b"alice", b"right") is None
    assert await authenticator.check(b"alice", b"new") == "alice"


async def test_identical_checks_in_flight_share_one_scrypt(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """64 clients logging in together as one user (a fleet starting) cost one scrypt, and a
    wrong password sent with them is still checked on its own."""
    checked: list[bytes] = []
    release = threading.Event()

    def slow_verify(password: bytes, stored: str) -> bool:
        checked.append(password)
        release.wait(10)  # every check is in flight before the first one answers
        return verify_password(password, stored)

    monkeypatch.setattr(auth, "verify_password", slow_verify)
    authenticator = auth.Authenticator(OneUser("alice", b"right"))  # type: ignore[arg-type]
    results: list[str | None] = []

    async def log_in(password: bytes) -> None:
        results.append(await authenticator.check(b"alice", password))

    async with trio.open_nursery() as nursery:
        for _ in range(64):
            nursery.start_soon(log_in, b"right")
        nursery.start_soon(log_in, b"wrong")
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert sorted(checked) == [b"right", b"wrong"]
    assert results.count("alice") == 64 and results.count(None) == 1


async def test_a_cancelled_check_leaves_its_waiters_to_check_on_their_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first of two identical checks is cancelled while it waits for a thread (bob's
    check holds the only one): the second does not take that as a "no"."""
    checked: list[bytes] = []
    release = threading.Event()

    def slow_verify(password: bytes, stored: str) -> bool:
        checked.append(password)
        release.wait(10)
        return verify_password(password, stored)

    monkeypatch.setattr(auth, "verify_password", slow_verify)
    store = OneUser("alice", b"right")
    store.hashes["bob"] = hash_password(b"bobs")
    authenticator = auth.Authenticator(store, threads=1)  # type: ignore[arg-type]
    answers: list[str | None] = []
    first_check = trio.CancelScope()

    async def first_login() -> None:
        with first_check:
            await authenticator.check(b"alice", b"right")

    async def log_in(user: bytes, password: bytes) -> None:
        answers.append(await authenticator.check(user, password))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(log_in, b"bob", b"bobs")  # holds the thread
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(first_login)  # waits for the thread
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(log_in, b"alice", b"right")  # waits for first_login's answer
        await trio.testing.wait_all_tasks_blocked()
        first_check.cancel()
        await trio.testing.wait_all_tasks_blocked()
        release.set()
    assert first_check.cancelled_caught
    assert sorted(answers, key=str) == ["alice", "bob"]
    assert checked == [b"bobs", b"right"]  # alice's waiter ran the check itself
