"""The authenticator's cache of verified passwords: fast for returning users, never a fast
"no" (the cost of a wrong password must not depend on who logged in recently)."""

from __future__ import annotations

import pytest

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
