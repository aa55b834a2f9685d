"""Rate and concurrency limits, sans-IO: callers pass the time (trio's clock in the server,
plain numbers in tests), so every limit is exact under a virtual clock.

Every table keyed by client IP is bounded (``max_keys``): a flood from many addresses can fill
it, but never grow it without end; idle entries go first, then the oldest.
"""

from __future__ import annotations

import collections
import ipaddress
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

__all__ = ["AuthBackoff", "Counts", "InFlight", "KeyedRate", "TokenBucket", "client_group"]

MAX_KEYS = 10_000
V = TypeVar("V")
T = TypeVar("T", bound=Hashable)

ClientGroup = ipaddress.IPv4Address | ipaddress.IPv6Network


def client_group(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ClientGroup:
    """What per-client limits count by: an IPv4 address, or an IPv6 address's /64 (one
    subscriber usually gets a whole /64, so counting single IPv6 addresses would limit
    nothing)."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ip
    return ipaddress.IPv6Network((int(ip) >> 64 << 64, 64))


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up."""

    def __init__(self, rate: float, burst: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self._stamp: float | None = None

    def _refill(self, now: float) -> None:
        if self._stamp is not None:
            self.tokens = min(self.burst, self.tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def try_take(self, n: float, now: float) -> bool:
        """Take *n* tokens if there are that many; else take none."""
        self._refill(now)
        if self.tokens < n:
            return False
        self.tokens -= n
        return True

    def consume(self, n: float, now: float) -> float:
        """Take *n* tokens even into debt; return how long to wait until the debt is paid.

        Bytes that were already moved cannot be refused, only paid for: waiting this long
        after each chunk keeps the average at ``rate`` whatever the chunk sizes."""
        self._refill(now)
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


def _bound(table: dict[Hashable, V], idle: Callable[[V], bool]) -> None:
    """Make room for one more key: drop idle entries, then the oldest ones."""
    if len(table) < MAX_KEYS:
        return
    for key in [k for k, v in table.items() if idle(v)]:
        del table[key]
    while len(table) >= MAX_KEYS:
        del table[next(iter(table))]


class KeyedRate:
    """A token bucket per key (client IP): ``rate`` events per second, ``burst`` at once."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[Hashable, TokenBucket] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, key: Hashable, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            _bound(self._buckets, lambda b: b.full(now))
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst)
        return bucket.try_take(1, now)


class AuthBackoff:
    """Failed logins per key: after ``threshold`` failures in a row the key is blocked for
    ``base`` seconds, doubling with each further failure up to ``cap``. A success, or ``cap``
    seconds without a failure, forgets the key."""

    def __init__(self, threshold: int, *, base: float = 1.0, cap: float = 300.0) -> None:
        self.threshold = threshold
        self.base = base
        self.cap = cap
        self._entries: dict[Hashable, tuple[int, float, float]] = {}
        """key -> (failures in a row, blocked until, last failure)."""

    def __len__(self) -> int:
        return len(self._entries)

    def blocked(self, key: Hashable, now: float) -> float:
        """Seconds *key* stays blocked (0 when it may try)."""
        entry = self._entries.get(key)
        if entry is None:
            return 0.0
        if now - entry[2] > self.cap and now >= entry[1]:
            del self._entries[key]
            return 0.0
        return max(0.0, entry[1] - now)

    def failed(self, key: Hashable, now: float) -> float:
        """Count a failure; return how long *key* is now blocked."""
        self.blocked(key, now)  # forgets a stale entry
        failures, _, _ = self._entries.pop(key, (0, 0.0, 0.0))
        _bound(self._entries, lambda e: now - e[2] > self.cap)
        failures += 1
        excess = failures - self.threshold
        # The exponent is bounded: 2.0**1024 raises OverflowError, and a client retrying at
        # each block's end keeps its streak (about 17 minutes of tries with a 1 s cap).
        block = 0.0 if excess < 0 else min(self.cap, self.base * 2.0 ** min(excess, 64))
        self._entries[key] = (failures, now + block, now)
        return block

    def succeeded(self, key: Hashable) -> None:
        self._entries.pop(key, None)


class Counts:
    """How many of something each key holds (sessions per user)."""

    def __init__(self) -> None:
        self._counts: collections.Counter[Hashable] = collections.Counter()

    def __getitem__(self, key: Hashable) -> int:
        return self._counts[key]

    def acquire(self, key: Hashable, limit: int | None) -> bool:
        """Take one unless *key* already holds *limit* (``None``: no limit)."""
        if limit is not None and self._counts[key] >= limit:
            return False
        self._counts[key] += 1
        return True

    def release(self, key: Hashable) -> None:
        self._counts[key] -= 1
        if self._counts[key] <= 0:
            del self._counts[key]


class InFlight(Generic[T]):
    """Things in flight (handshakes), oldest first, overall and per key (client group).

    Admitting one over a cap never refuses it: :meth:`add` takes the oldest out of the way
    instead, first of its key's, then overall, and returns them for the caller to end. So a
    flood can only push out its own (and, at the global cap, the oldest) unfinished ones, and
    whoever finishes promptly gets through. Every operation is O(1) per item moved.
    """

    def __init__(self) -> None:
        self._all: collections.OrderedDict[T, Hashable] = collections.OrderedDict()
        self._by_key: dict[Hashable, collections.OrderedDict[T, None]] = {}

    def __len__(self) -> int:
        return len(self._all)

    def count(self, key: Hashable) -> int:
        return len(self._by_key.get(key, ()))

    def add(
        self, item: T, key: Hashable, *, key_cap: int | None, cap: int | None
    ) -> list[tuple[T, str]]:
        """Add *item* under *key*; return what was taken out to make room, each with the cap
        it was over: ``"key"`` (*key_cap*) or ``"all"`` (*cap*). ``None``: no such cap."""
        evicted: list[tuple[T, str]] = []
        while key_cap is not None and self.count(key) >= max(1, key_cap):
            oldest = next(iter(self._by_key[key]))
            self.remove(oldest)
            evicted.append((oldest, "key"))
        while cap is not None and len(self._all) >= max(1, cap):
            oldest = next(iter(self._all))
            self.remove(oldest)
            evicted.append((oldest, "all"))
        self._all[item] = key
        self._by_key.setdefault(key, collections.OrderedDict())[item] = None
        return evicted

    def touch(self, item: T) -> None:
        """*item* made progress: it becomes the newest (the last to be evicted)."""
        if item in self._all:
            self._all.move_to_end(item)
            self._by_key[self._all[item]].move_to_end(item)

    def remove(self, item: T) -> bool:
        """Take *item* out; ``False`` if it was not in (already evicted)."""
        if item not in self._all:
            return False
        key = self._all.pop(item)
        group = self._by_key[key]
        del group[item]
        if not group:
            del self._by_key[key]
        return True
