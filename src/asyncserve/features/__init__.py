"""Feature sources: where a request's features come from, fetched concurrently and batched across requests.

Backends (each imports its client library only when used):
``PostgresSource`` (asyncpg), ``RedisSource`` (redis.asyncio), ``HttpSource`` (one shared pooled client),
``FileSource`` (CSV/JSON tables, reloaded when they change), and ``FunctionSource`` for an ``async def`` of one's own.
"""

from asyncserve.features.fetcher import Feature, FetchedFeatures, fetch_features
from asyncserve.features.files import FileSource
from asyncserve.features.function import FunctionSource
from asyncserve.features.http import HttpSource
from asyncserve.features.postgres import PostgresSource
from asyncserve.features.redis import RedisSource
from asyncserve.features.source import BreakerState, CircuitBreaker, FeatureSource, SourcePolicy

__all__ = [
    "BreakerState",
    "CircuitBreaker",
    "Feature",
    "FeatureSource",
    "FetchedFeatures",
    "FileSource",
    "FunctionSource",
    "HttpSource",
    "PostgresSource",
    "RedisSource",
    "SourcePolicy",
    "fetch_features",
]
