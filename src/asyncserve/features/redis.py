"""RedisSource: feature rows from Redis hashes or JSON strings, many keys per round trip (redis.asyncio)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import orjson

from asyncserve.exceptions import ConfigurationError
from asyncserve.features.source import FeatureSource, Key, Row


class RedisSource(FeatureSource):
    """Rows stored under ``key_template.format(key=...)``.

    Hashes are read with one pipelined ``HGETALL`` per key, JSON strings with one ``MGET``: either way,
    one round trip for all the keys of a batch.

    Example::

        profiles = RedisSource("profiles", "redis://cache:6379/0", key_template="user:{key}", cache_ttl_s=5)
    """

    def __init__(
        self,
        name: str,
        url: str,
        *,
        key_template: str = "{key}",
        kind: Literal["hash", "json"] = "hash",
        **policy: Any,
    ) -> None:
        super().__init__(name, **policy)
        if kind not in ("hash", "json"):
            raise ConfigurationError(f"RedisSource {name!r}: kind must be 'hash' or 'json', got {kind!r}")
        self.url = url
        self.key_template = key_template
        self.kind = kind
        self._client: Any = None

    async def _open(self) -> None:
        try:
            from redis import asyncio as aioredis
        except ImportError:
            raise ConfigurationError("RedisSource needs redis: pip install 'asyncserve[redis]'") from None
        self._client = aioredis.from_url(self.url, decode_responses=True)

    async def _fetch(self, keys: list[Key]) -> Mapping[Key, Row]:
        names = [self.key_template.format(key=key) for key in keys]
        if self.kind == "json":
            values = await self._client.mget(names)
            return {key: orjson.loads(value) for key, value in zip(keys, values, strict=True) if value is not None}
        async with self._client.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hgetall(name)
            hashes = await pipe.execute()
        return {key: row for key, row in zip(keys, hashes, strict=True) if row}

    async def _close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
