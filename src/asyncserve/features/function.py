"""FunctionSource: an ``async def`` of one's own as a feature source, with every shared policy."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from asyncserve.exceptions import ConfigurationError
from asyncserve.features.source import FeatureSource, Key, Row

Lookup = Callable[[list[Key]], Awaitable[Mapping[Key, Row]]]


class FunctionSource(FeatureSource):
    """Calls ``fetch(keys) -> {key: row}`` once per round trip (keys batched across requests).

    Example::

        async def scores(keys):
            return {key: {"score": s} for key, s in zip(keys, await scoring_service.many(keys))}

        FunctionSource("scores", scores, timeout_s=0.1, cache_ttl_s=10)
    """

    def __init__(self, name: str, fetch: Lookup, **policy: Any) -> None:
        super().__init__(name, **policy)
        if not inspect.iscoroutinefunction(fetch):
            raise ConfigurationError(f"FunctionSource {name!r} needs an async def fetch(keys), got {fetch!r}")
        self._function = fetch

    async def _fetch(self, keys: list[Key]) -> Mapping[Key, Row]:
        return await self._function(keys)
