"""Pipeline: one request's way through features, the model's batcher, and the prediction log."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from asyncserve.features import FeatureSource, fetch_features
from asyncserve.metrics import Metrics
from asyncserve.predlog import PredictionLogger, prediction_record
from asyncserve.registry import ModelEntry, ModelRegistry
from asyncserve.tensors import Columns

logger = logging.getLogger(__name__)


@dataclass
class Prediction:
    outputs: Columns
    degraded: list[str] = field(default_factory=list)
    """Feature sources whose declared defaults stood in for them."""
    stages_ms: dict[str, float] = field(default_factory=dict)


class Pipeline:
    """Runs requests: features from every source at once, then the model (batched), then the log."""

    def __init__(self, registry: ModelRegistry, metrics: Metrics, predlog: PredictionLogger | None = None) -> None:
        self.registry = registry
        self.predlog = predlog
        self._metrics = metrics
        self.sources = _unique_sources(registry)

    async def open(self) -> None:
        """Connect every feature source (one that cannot connect yet keeps retrying on use)."""
        await asyncio.gather(*(s.open(self._metrics.for_source(s.name)) for s in self.sources))

    async def aclose(self) -> None:
        await asyncio.gather(*(source.aclose() for source in self.sources))

    def unhealthy_sources(self) -> list[str]:
        """Sources whose failures fail requests (no defaults) and whose circuit breaker is open."""
        failing = {f.source.name for e in self.registry.entries for f in e.spec.features if f.on_error == "fail"}
        return [s.name for s in self.sources if s.name in failing and not s.healthy]

    async def run(
        self,
        entry: ModelEntry,
        columns: Columns,
        rows: int,
        deadline: float,
        *,
        priority: int = 0,
        request_id: str = "",
    ) -> Prediction:
        spec = entry.spec
        if self.predlog is not None:
            # With overflow="refuse", a full log turns the prediction away before any work (503).
            self.predlog.check_room()
        started = time.perf_counter()
        fetched = await fetch_features(spec.features, columns, deadline)
        fetched_at = time.perf_counter()
        outputs = await self.registry.predict(entry, {**columns, **fetched.columns}, rows, deadline, priority)
        done_at = time.perf_counter()
        for source in fetched.degraded:
            self._metrics.degraded.labels(spec.label, source).inc()
        stages = {"features": (fetched_at - started) * 1000, "model": (done_at - fetched_at) * 1000}
        if self.predlog is not None:
            record = prediction_record(
                request_id=request_id, model=spec.name, version=spec.version or "", inputs=columns,
                outputs=outputs, features=fetched.columns, latency_ms=stages, degraded=bool(fetched.degraded),
            )  # fmt: skip
            self.predlog.record(record)
        return Prediction(outputs, fetched.degraded, stages)


def _unique_sources(registry: ModelRegistry) -> list[FeatureSource]:
    sources: dict[int, FeatureSource] = {}
    names: dict[str, FeatureSource] = {}
    for entry in registry.entries:
        for feature in entry.spec.features:
            source = feature.source
            other = names.setdefault(source.name, source)
            if other is not source:
                raise ValueError(f"two different feature sources are named {source.name!r}; give each its own name")
            sources[id(source)] = source
    return list(sources.values())
