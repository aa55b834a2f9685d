"""Coverage-guided fuzzing (atheris) of what a hostile client controls, parsed as the server
parses it: the handshake from a buffer that fills in chunks of any size, UDP headers through
the reassembler, and rule tables from TOML.

Run (from the repository root; ``pip install atheris`` first)::

    mkdir -p fuzz/work && python fuzz/fuzz_protocol.py fuzz/work fuzz/corpus -max_total_time=300

New inputs go to ``fuzz/work`` (ignored by git); ``fuzz/corpus`` holds the seeds.

The only errors allowed out of the code under test are the ones it documents (``SocksError``
and friends); anything else is a finding, and atheris saves the input that caused it.
``tests/test_fuzz_corpus.py`` replays the corpus through :func:`fuzz_one` in the test suite.
"""

from __future__ import annotations

import sys
import tomllib
from collections.abc import Callable
from typing import Any

from trisocks.policy.rules import RuleError, parse_rules
from trisocks.protocol import (
    Reassembler,
    SocksError,
    parse_auth_request,
    parse_greeting,
    parse_request,
    parse_udp_header,
)

HANDSHAKE: tuple[Callable[[bytearray], Any], ...] = (
    parse_greeting, parse_auth_request, parse_request,
)


def _handshake(sizes: bytes, data: bytes) -> None:
    """Feed *data* in chunks sized by *sizes*, parsing messages in the server's order."""
    buf = bytearray()
    stage, at = 0, 0
    chunks = [1 + s % 64 for s in sizes] or [len(data) or 1]
    n = 0
    while at < len(data) and stage < len(HANDSHAKE):
        step = chunks[n % len(chunks)]
        n += 1
        buf += data[at : at + step]
        at += step
        while stage < len(HANDSHAKE):
            parsed = HANDSHAKE[stage](buf)
            if parsed is None:
                break
            _message, used = parsed
            assert 0 < used <= len(buf), "a parser claimed bytes it was not given"
            del buf[:used]
            stage += 1


def _datagrams(data: bytes) -> None:
    reassembler = Reassembler(timeout=5.0)
    for now, datagram in enumerate(data.split(b"\xff\xfe")):
        header = parse_udp_header(datagram)
        reassembler.feed(header, datagram[header.offset :], float(now))


def _rules(data: bytes) -> None:
    parse_rules(tomllib.loads(data.decode()).get("rules", []))


def fuzz_one(data: bytes) -> None:
    """One input: its first byte picks the target, the rest is the client's bytes."""
    if not data:
        return
    target, rest = data[0] % 3, data[1:]
    try:
        if target == 0:
            split = rest.find(b"|")
            _handshake(rest[:split] if split >= 0 else b"", rest[split + 1 :])
        elif target == 1:
            _datagrams(rest)
        else:
            _rules(rest)
    except (SocksError, RuleError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        pass


def main() -> None:
    import atheris

    atheris.instrument_all()
    atheris.Setup(sys.argv, fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
