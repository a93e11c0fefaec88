"""HttpSource: feature rows from an HTTP service, over one pooled aiohttp client session per source.

aiohttp, not httpx: at 256 concurrent requests httpx cost about 29 times the CPU per request
(benchmarks/results/io.md), and the client's CPU per fetch is what bounds a server on one core.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import orjson

from asyncserve import tracing
from asyncserve.exceptions import ConfigurationError
from asyncserve.features.source import FeatureSource, Key, Row


class HttpSource(FeatureSource):
    """GETs ``url.format(key=...)`` per key (404 means no row), or, when the service offers one,
    POSTs all the keys of a round trip to ``batch_url`` as ``{"keys": [...]}`` and reads
    ``{"<key>": row or null, ...}`` back.

    Example::

        users = HttpSource("users", "http://features:8080/users/{key}",
                           batch_url="http://features:8080/users:batch", timeout_s=0.2)
    """

    def __init__(
        self,
        name: str,
        url: str,
        *,
        batch_url: str | None = None,
        pool_size: int = 256,
        headers: Mapping[str, str] | None = None,
        **policy: Any,
    ) -> None:
        super().__init__(name, **policy)
        if "{key}" not in url:
            raise ConfigurationError(f"HttpSource {name!r}: url must contain {{key}}, got {url!r}")
        self.url = url
        self.batch_url = batch_url
        self.pool_size = pool_size
        self.headers = dict(headers or {})
        self._client: Any = None

    async def _open(self) -> None:
        try:
            import aiohttp
        except ImportError:
            raise ConfigurationError("HttpSource needs aiohttp: pip install 'asyncserve[http]'") from None
        connector = aiohttp.TCPConnector(limit=self.pool_size, limit_per_host=self.pool_size)
        # No timeouts of aiohttp's own: the base class caps every round trip at policy.timeout_s, and
        # each of aiohttp's would arm one more timer per request.
        timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=None, sock_read=None)
        self._client = aiohttp.ClientSession(connector=connector, headers=self.headers, timeout=timeout)

    async def _fetch(self, keys: list[Key]) -> Mapping[Key, Row]:
        if self.batch_url is not None:
            return await self._fetch_batch(keys)
        if len(keys) == 1:  # the common case needs no task per key (gather would make one)
            row = await self._fetch_one(keys[0])
            return {} if row is None else {keys[0]: row}
        rows = await asyncio.gather(*(self._fetch_one(key) for key in keys))
        return {key: row for key, row in zip(keys, rows, strict=True) if row is not None}

    async def _fetch_one(self, key: Key) -> Row | None:
        headers = None if tracing.tracer is None else tracing.outgoing_headers({})
        async with self._client.get(self.url.format(key=key), headers=headers) as response:
            if response.status == 404:
                return None
            response.raise_for_status()
            row: Row = orjson.loads(await response.read())
            return row

    async def _fetch_batch(self, keys: list[Key]) -> Mapping[Key, Row]:
        body = orjson.dumps({"keys": keys})
        headers = _JSON if tracing.tracer is None else tracing.outgoing_headers(_JSON)
        async with self._client.post(self.batch_url, data=body, headers=headers) as response:
            response.raise_for_status()
            found = orjson.loads(await response.read())
        return {key: found[str(key)] for key in keys if found.get(str(key)) is not None}

    async def _close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


_JSON = {"Content-Type": "application/json"}
