"""Retention tiers below the device: an LRU of KV blocks by content hash, bounded by bytes and by time.

The seeds keep a KV cache "from minutes to hours, depending on the cache policy, memory and budget":
each tier (host memory, then disk) has a byte budget and a TTL counted from a block's last use. What a
tier lets go of, it returns to its caller, which moves it one tier down (or drops it at the bottom),
so no block is silently lost and none is held twice by one tier. Pure bookkeeping with an injectable
clock: the tests drive time by hand.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

V = TypeVar("V")
Clock = Callable[[], float]
Why = Literal["budget", "ttl", "too_big"]


@dataclass
class _Entry(Generic[V]):
    value: V
    nbytes: int
    used: float  # clock time of the last put or hit


@dataclass(frozen=True)
class Released(Generic[V]):
    """A block a tier let go of, and why: the caller moves it down a tier or drops it."""

    key: int
    value: V
    nbytes: int
    why: Why


class LRUTier(Generic[V]):
    """Blocks by hash, least recently used first out; `capacity_bytes` and `ttl_seconds` bound it."""

    def __init__(self, capacity_bytes: int, ttl_seconds: float | None, clock: Clock = time.monotonic) -> None:
        if capacity_bytes < 0:
            raise ValueError("capacity_bytes must be >= 0")
        self.capacity_bytes = capacity_bytes
        self.ttl_seconds = ttl_seconds
        self.clock = clock
        self.used_bytes = 0
        self._entries: OrderedDict[int, _Entry[V]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: int) -> bool:
        """Held and not expired (a look that does not count as a use)."""
        entry = self._entries.get(key)
        return entry is not None and not self._expired(entry, self.clock())

    def get(self, key: int) -> V | None:
        """The block, now the most recently used; None when absent or past its TTL (`expire` hands
        expired blocks back, so that the caller can move them down a tier)."""
        entry = self._entries.get(key)
        now = self.clock()
        if entry is None or self._expired(entry, now):
            return None
        entry.used = now
        self._entries.move_to_end(key)
        return entry.value

    def put(self, key: int, value: V, nbytes: int) -> list[Released[V]]:
        """Keep `value` as the most recently used block; returns what had to go to make room (oldest
        first), or the block itself when it alone exceeds the budget."""
        if nbytes > self.capacity_bytes:
            return [Released(key, value, nbytes, "too_big")]
        released = self.expire()
        if key in self._entries:
            self._remove(key)
        while self.used_bytes + nbytes > self.capacity_bytes:
            oldest, entry = next(iter(self._entries.items()))
            self._remove(oldest)
            released.append(Released(oldest, entry.value, entry.nbytes, "budget"))
        self._entries[key] = _Entry(value, nbytes, self.clock())
        self.used_bytes += nbytes
        return released

    def pop(self, key: int) -> V | None:
        """Take a block out (it moves up a tier on a hit)."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._remove(key)
        return entry.value

    def expire(self) -> list[Released[V]]:
        """Drop every block past its TTL (oldest first) and hand them back."""
        if self.ttl_seconds is None:
            return []
        now = self.clock()
        released: list[Released[V]] = []
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            if not self._expired(entry, now):
                break  # LRU order is last-use order: the rest are younger
            self._remove(key)
            released.append(Released(key, entry.value, entry.nbytes, "ttl"))
        return released

    def _expired(self, entry: _Entry[V], now: float) -> bool:
        return self.ttl_seconds is not None and now - entry.used > self.ttl_seconds

    def _remove(self, key: int) -> None:
        self.used_bytes -= self._entries.pop(key).nbytes
