"""PostgresSource: feature rows from a PostgreSQL table or query, many keys per round trip (asyncpg)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from asyncserve.exceptions import ConfigurationError
from asyncserve.features.source import FeatureSource, Key, Row


class PostgresSource(FeatureSource):
    """Rows of ``table`` (or of ``query``) by ``key_column``; concurrent requests share one ``= ANY($1)`` query.

    Example::

        users = PostgresSource("users", "postgresql://app@db/features", table="users", key_column="user_id",
                               timeout_s=0.2, cache_ttl_s=30)

    A ``query`` of one's own must take the keys as ``$1`` (an array) and return ``key_column``.
    """

    def __init__(
        self,
        name: str,
        dsn: str,
        *,
        key_column: str,
        table: str | None = None,
        query: str | None = None,
        pool_size: int = 10,
        **policy: Any,
    ) -> None:
        super().__init__(name, **policy)
        if (table is None) == (query is None):
            raise ConfigurationError(f"PostgresSource {name!r} needs exactly one of table= or query=")
        self.dsn = dsn
        self.key_column = key_column
        self.query = query or f"SELECT * FROM {_quote(table or '')} WHERE {_quote(key_column)} = ANY($1)"
        self.pool_size = pool_size
        self._pool: Any = None

    async def _open(self) -> None:
        try:
            import asyncpg
        except ImportError:
            raise ConfigurationError("PostgresSource needs asyncpg: pip install 'asyncserve[postgres]'") from None
        self._pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.pool_size)

    async def _fetch(self, keys: list[Key]) -> Mapping[Key, Row]:
        records = await self._pool.fetch(self.query, keys)
        return {record[self.key_column]: dict(record) for record in records}

    async def _close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None


def _quote(identifier: str) -> str:
    """Quote a (possibly schema-qualified) identifier, so a table name can never inject SQL."""
    return ".".join('"' + part.replace('"', '""') + '"' for part in identifier.split("."))
