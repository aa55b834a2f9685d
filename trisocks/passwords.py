"""Password hashing (scrypt, from the standard library) and constant-time checks.

Stored form: ``scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>``. Verifying costs tens of
milliseconds on purpose; :class:`trisocks.identity.store.Authenticator` runs it in a worker
thread and keeps a keyed digest of each password it has verified, so a returning client costs
microseconds.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

__all__ = ["hash_password", "verify_password"]

_LOG2_N, _R, _P, _DKLEN = 14, 8, 1, 32


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def hash_password(password: bytes) -> str:
    """Hash *password* with a fresh 16-byte salt."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password, salt=salt, n=1 << _LOG2_N, r=_R, p=_P, dklen=_DKLEN, maxmem=64 << 20
    )
    return f"scrypt${_LOG2_N}${_R}${_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: bytes, stored: str) -> bool:
    """True if *password* matches *stored*; compares in constant time. A malformed *stored*
    value never matches."""
    try:
        scheme, log2_n, r, p, salt, expected = stored.split("$")
        if scheme != "scrypt":
            return False
        want = base64.b64decode(expected)
        digest = hashlib.scrypt(
            password,
            salt=base64.b64decode(salt),
            n=1 << int(log2_n),
            r=int(r),
            p=int(p),
            dklen=len(want),
            maxmem=64 << 20,
        )
    except ValueError:
        return False
    return hmac.compare_digest(digest, want)


DUMMY_HASH = hash_password(b"not a password anyone has")
"""Checked against when the user does not exist, so unknown names cost the same time."""
