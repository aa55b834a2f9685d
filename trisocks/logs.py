"""Logging set-up: plain text or one JSON object per line.

The access log (logger ``trisocks.access``) carries a ``session`` dict in each record; the JSON
formatter puts its fields at the top level. Nothing here ever sees a password: the handshake
never logs credentials, only the user name.

A text line cannot be forged by what a client sends (a target name, a user name, a reason
quoting either): the access line puts every such value through :func:`quote`, so each is one
field, and :class:`TextFormatter` escapes any character that is not printable left in a
message, so one record is one line.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time

__all__ = ["TextFormatter", "escape_unprintable", "quote", "setup_logging"]

_BARE = re.compile(r"[!#-<>-\[\]-~]+")
"""A value of printable ASCII but space, ``"``, ``=`` and backslash: written as it is."""
_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}
_INVISIBLE = frozenset("\u034f\u115f\u1160\u3164\uffa0")
"""Printable to Python but shown as nothing (fillers, the grapheme joiner): escaped too."""


def _escape_char(c: str) -> str:
    if c in _ESCAPES:
        return _ESCAPES[c]
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def _safe(c: str) -> bool:
    return c.isprintable() and c not in _INVISIBLE


def quote(value: str | None) -> str:
    """*value* as one field of a text log line; ``-`` for None.

    A value of plain printable ASCII without space, ``"``, ``=`` or backslash (and not ``-``
    itself) is written as it is. Anything else is double-quoted, with backslash escapes:
    ``\\\\``, ``\\"``, ``\\n``, ``\\r``, ``\\t``, and ``\\xNN``/``\\uNNNN``/``\\UNNNNNNNN`` for
    every character that is not printable (C0 and C1 controls, DEL, bidi and other format
    characters, line and paragraph separators, spaces other than U+0020, surrogates,
    unassigned code points) or is invisible. Printable non-ASCII stays as it is. The result is
    one line of printable characters, and reads back to exactly *value*.
    """
    if value is None:
        return "-"
    if value != "-" and _BARE.fullmatch(value):
        return value
    return '"' + "".join(
        c if _safe(c) and c not in _ESCAPES else _escape_char(c) for c in value
    ) + '"'


def escape_unprintable(text: str) -> str:
    """*text* with every character :func:`quote` would escape as a backslash escape, the rest
    (quotes and backslashes included) as it is: one line, whatever *text* holds."""
    if text.isprintable() and not _INVISIBLE.intersection(text):
        return text
    return "".join(c if _safe(c) else _escape_char(c) for c in text)


class TextFormatter(logging.Formatter):
    """``time level logger: message`` in UTC. The message is one line: characters that are
    not printable (a newline a client managed to get into it) are escaped. A traceback, which
    only internal errors carry, follows on lines of its own."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.converter = time.gmtime

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape_unprintable(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        session = getattr(record, "session", None)
        if isinstance(session, dict):
            entry["event"] = "session"
            entry.update(session)
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


def setup_logging(fmt: str = "text", level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
