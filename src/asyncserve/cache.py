"""A bounded TTL cache on the monotonic clock, for feature lookups and predictions."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

V = TypeVar("V")

_MISSING = object()


class TTLCache(Generic[V]):
    """Keeps up to ``max_entries`` values for ``ttl_s`` seconds each, evicting the least recently used.

    Example::

        cache: TTLCache[dict[str, float]] = TTLCache(ttl_s=30.0, max_entries=10_000)
        cache.put("user:7", {"age": 31.0})
        cache.get("user:7")  # {"age": 31.0} until 30 s have passed
    """

    def __init__(self, ttl_s: float, max_entries: int = 10_000) -> None:
        if ttl_s <= 0 or max_entries < 1:
            raise ValueError(f"a cache needs ttl_s > 0 and max_entries >= 1, got {ttl_s} and {max_entries}")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, tuple[float, V]] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable, default: V | None = None) -> V | None:
        entry = self._entries.get(key)
        if entry is None or entry[0] <= time.monotonic():
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return default
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[1]

    def __contains__(self, key: Hashable) -> bool:
        entry = self._entries.get(key)
        return entry is not None and entry[0] > time.monotonic()

    def put(self, key: Hashable, value: V) -> None:
        self._entries[key] = (time.monotonic() + self.ttl_s, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"TTLCache(entries={len(self)}, ttl_s={self.ttl_s}, hits={self.hits}, misses={self.misses})"
