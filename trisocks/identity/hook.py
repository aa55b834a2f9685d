"""The ``http`` password backend: RFC 1929 credentials checked by the operator's own service.

Each login is a ``POST`` to ``auth_hook_url`` of the JSON object::

    {"user": "alice", "password": "...", "client": "192.0.2.7",
     "listener": "0.0.0.0:1080", "method": "socks5"}

(``user`` and ``password`` as UTF-8 text: credentials that are not UTF-8 are refused without
asking; ``method`` is ``socks5`` or ``http``), with ``Authorization: Bearer <token>`` when
``auth_hook_token_file`` names a file (its first line). The hook answers:

- ``200`` with ``{"allow": true, "user": "<canonical name>", "groups": ["staff", ...]}``: the
  identity ``http:<canonical name>`` (``groups`` is optional; rules name them ``@staff``);
- ``200`` with ``{"allow": false}``, or ``401`` or ``403``: refused;
- anything else (no answer within ``auth_hook_timeout`` seconds, a refused connection, a
  ``5xx`` or any other status, a redirect, a body that is not such an object): a
  :class:`BackendError`, so the login fails closed. Its message names the status or the
  problem, never the password.

One ``httpx.AsyncClient`` (running on trio) keeps connections to the hook open between logins.
Redirects are not followed: a hook that moved must be configured again.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx
import trio

from trisocks.identity.model import BackendError, Identity, LoginRequest

if TYPE_CHECKING:
    from trisocks.config.settings import Config

__all__ = ["HookBackend", "parse_answer"]

MAX_BODY = 64 * 1024
"""The longest answer read from the hook."""


def _valid_name(value: object) -> bool:
    return (isinstance(value, str) and value != ""
            and not any(ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 for c in value))


def parse_answer(status: int, body: bytes) -> Identity | None:
    """The identity a hook's answer (*status*, *body*) gives, or ``None`` for a refusal.

    Raises:
        BackendError: the answer is neither an acceptance nor a refusal.
    """
    if status in (401, 403):
        return None
    if status != 200:
        raise BackendError(f"the auth hook answered HTTP {status}")
    try:
        answer: Any = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BackendError("the auth hook answered 200 with a body that is not JSON") from None
    if not isinstance(answer, dict) or not isinstance(answer.get("allow"), bool):
        raise BackendError('the auth hook answered 200 without a boolean "allow"')
    if not answer["allow"]:
        return None
    user = answer.get("user")
    if not isinstance(user, str) or not _valid_name(user):
        raise BackendError('the auth hook allowed a login without a valid "user" (a non-empty '
                           "string without control characters)")
    groups = answer.get("groups", [])
    if not isinstance(groups, list) or not all(_valid_name(g) for g in groups):
        raise BackendError('the auth hook\'s "groups" is not a list of non-empty strings')
    return Identity("http", user, frozenset(groups))


class HookBackend:
    """Checks logins with a POST to ``config.auth_hook_url`` (module docstring)."""

    source = "http"

    def __init__(self, config: Config) -> None:
        if config.auth_hook_url is None:
            raise ValueError("the http password backend needs auth_hook_url")
        self.url = config.auth_hook_url
        self.timeout = config.auth_hook_timeout
        headers = {"User-Agent": "trisocks"}
        if config.auth_hook_token_file is not None:
            lines = config.auth_hook_token_file.read_text().splitlines()
            token = lines[0].strip() if lines else ""
            if token:
                headers["Authorization"] = f"Bearer {token}"
        self._client = httpx.AsyncClient(
            headers=headers, timeout=httpx.Timeout(self.timeout), follow_redirects=False)

    async def _ask(self, request: LoginRequest) -> Identity | None:
        try:
            user = request.user.decode()
            password = request.password.decode()
        except UnicodeDecodeError:
            return None
        payload = {"user": user, "password": password, "client": request.client,
                   "listener": request.listener, "method": request.method}
        # httpx's timeout bounds each step (connect, each read); the whole exchange is bounded
        # here too, so a hook that answers a byte at a time cannot hold the login longer.
        status, body, timed_out = 0, b"", False
        with trio.move_on_after(self.timeout) as scope:
            try:
                async with self._client.stream("POST", self.url, json=payload) as response:
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_BODY:
                            raise BackendError(f"the auth hook's answer is over {MAX_BODY} bytes")
                    status = response.status_code
            except httpx.TimeoutException:
                timed_out = True
            except httpx.HTTPError as exc:
                raise BackendError(f"the auth hook at {self.url} cannot be reached: "
                                   f"{type(exc).__name__}: {exc}") from None
        if timed_out or scope.cancelled_caught:
            raise BackendError(f"the auth hook did not answer within {self.timeout:g} s")
        return parse_answer(status, body)

    async def login(self, request: LoginRequest) -> Identity | None:
        """The ``http`` identity the hook gives the credentials, or ``None``.

        Raises:
            BackendError: the hook did not answer, or answered something else.
        """
        return await self._ask(request)

    async def revalidate(self, identity: Identity, request: LoginRequest) -> bool:
        """The same question again: whether the hook still allows the login, as the same
        user."""
        fresh = await self._ask(request)
        return fresh is not None and fresh.name == identity.name

    async def aclose(self) -> None:
        await self._client.aclose()
