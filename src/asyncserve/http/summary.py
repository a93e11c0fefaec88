"""The numbers behind ``GET /ui/summary``: what each model and the server did over the last few seconds.

Read from the server's own counters (``LoopCounter`` and ``LoopHistogram`` in ``metrics.py``, the
batchers' queues, the loop-lag probe), never from Prometheus text: a poll costs a few dictionary walks.
Rates and percentiles are over a recent window: the counters now, less a snapshot taken about
``WINDOW_S`` ago (snapshots are kept only as the summary is asked for, at most one per
``SNAPSHOT_SPACING_S``, so an idle dashboard costs nothing).

With ``--workers N`` every worker reports its own window (``WorkerWindow.report``) and the worker that
answers adds them up (``merge``): rates and bucket counts add, percentiles come from the added buckets.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from asyncserve.metrics import LoopLagProbe, Metrics
from asyncserve.runtime.registry import ModelRegistry

WINDOW_S = 3.0
"""Rates and percentiles are over about this many seconds."""

SNAPSHOT_SPACING_S = 0.25
"""Snapshots kept no closer than this: many viewers polling cost no more memory than one."""

INFERENCE_ROUTES = frozenset({"v2_infer", "v1_predict", "v2_generate", "v2_generate_stream"})
"""The routes whose requests count in a model's throughput and latency."""


@dataclass
class ModelCounts:
    """One model's counters at one moment (cumulative)."""

    latency: list[int]
    """Inference requests answered, by latency bucket (``LATENCY_BUCKETS_S``, not accumulated)."""
    rows: float = 0.0
    batch_rows: float = 0.0
    batches: int = 0
    shed: dict[str, float] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return sum(self.latency)


@dataclass
class Snapshot:
    """This worker's counters at one moment (``time.monotonic()``)."""

    at: float
    models: dict[str, ModelCounts]
    busy_s: float
    """Seconds the models spent predicting, every model together."""


class WorkerWindow:
    """This worker's counters over the recent window, as a JSON-ready report.

    Example::

        window = WorkerWindow(registry, metrics, loop_lag, executor_workers=4, index=0)
        report = window.report()  # {"worker": 0, "window_s": ..., "models": {...}, ...}
    """

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics,
        loop_lag: LoopLagProbe,
        *,
        executor_workers: int,
        index: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry, self._metrics, self._loop_lag = registry, metrics, loop_lag
        self._executor_workers, self._index, self._clock = executor_workers, index, clock
        self._buckets = len(metrics.request_duration.bounds)
        self._history: deque[Snapshot] = deque([self._snapshot()])

    def report(self) -> dict[str, Any]:
        """The window's rates and counts, this worker's gauges, and the running totals."""
        now = self._snapshot()
        base = self._base_for(now)
        elapsed = max(now.at - base.at, 1e-6)
        models = {label: _model_report(counts, base.models.get(label), elapsed) for label, counts in now.models.items()}
        for entry in self._registry.entries:
            models[entry.spec.label]["queued_rows"] = entry.batcher.queued_rows
        return {
            "worker": self._index,
            "window_s": elapsed,
            "loop_lag_s": self._loop_lag.recent_lag_s,
            "in_flight": self._metrics.in_flight_total(),
            "executor_workers": self._executor_workers,
            "busy_s_per_s": (now.busy_s - base.busy_s) / elapsed,
            "models": models,
        }

    def _base_for(self, now: Snapshot) -> Snapshot:
        """The newest snapshot at least ``WINDOW_S`` old (else the oldest); ``now`` joins the history."""
        history = self._history
        while len(history) > 1 and history[1].at <= now.at - WINDOW_S:
            history.popleft()
        base = history[0]
        if now.at - history[-1].at >= SNAPSHOT_SPACING_S:
            history.append(now)
        return base

    def _snapshot(self) -> Snapshot:
        metrics = self._metrics
        models = {entry.spec.label: ModelCounts([0] * self._buckets) for entry in self._registry.entries}
        labels_of = _labels_by_name(models)
        for (route, name), child in metrics.request_duration.children():
            if route in INFERENCE_ROUTES:
                for label in labels_of.get(name, ()):
                    models[label].latency = [a + b for a, b in zip(models[label].latency, child.counts, strict=True)]
        _count_batches(metrics, models)
        busy_s = sum(duration.sum for _, duration in metrics.inference_duration.children())
        return Snapshot(self._clock(), models, busy_s)


def _count_batches(metrics: Metrics, models: dict[str, ModelCounts]) -> None:
    """Rows predicted, batches and their rows, and requests shed, into each model's counts."""
    for (label,), histogram in metrics.batch_rows.children():
        if label in models:
            models[label].batch_rows, models[label].batches = histogram.sum, sum(histogram.counts)
    for (label,), counter in metrics.inference_rows.children():
        if label in models:
            models[label].rows = counter.value
    for (label, reason), counter in metrics.batch_shed.children():
        if label in models:
            models[label].shed[reason] = counter.value


def _labels_by_name(models: Iterable[str]) -> dict[str, list[str]]:
    """Request metrics count by model name; batch metrics by label (``name:version``)."""
    labels: dict[str, list[str]] = {}
    for label in models:
        labels.setdefault(label.partition(":")[0], []).append(label)
    return labels


def _model_report(now: ModelCounts, base: ModelCounts | None, elapsed: float) -> dict[str, Any]:
    base = base or ModelCounts([0] * len(now.latency))
    latency = [a - b for a, b in zip(now.latency, base.latency, strict=True)]
    return {
        "requests_per_s": sum(latency) / elapsed,
        "rows_per_s": (now.rows - base.rows) / elapsed,
        "latency": latency,
        "batch_rows": now.batch_rows - base.batch_rows,
        "batches": now.batches - base.batches,
        "shed_per_s": {reason: (n - base.shed.get(reason, 0.0)) / elapsed for reason, n in now.shed.items()},
        "requests_total": now.requests,
        "shed_total": dict(now.shed),
    }


def merge(reports: Iterable[Mapping[str, Any]], bounds: tuple[float, ...]) -> dict[str, Any]:
    """The server's summary from every worker's report: rates and counts added, percentiles from the sum."""
    reports = sorted(reports, key=lambda report: int(report["worker"]))
    models: dict[str, dict[str, Any]] = {}
    for report in reports:
        for label, model in report["models"].items():
            models[label] = _add(models[label], model) if label in models else dict(model)
    busy = sum(float(report["busy_s_per_s"]) for report in reports)
    capacity = sum(int(report["executor_workers"]) for report in reports) or 1
    return {
        "server": {
            "loop_lag_s": max((float(report["loop_lag_s"]) for report in reports), default=0.0),
            "in_flight": sum(int(report["in_flight"]) for report in reports),
            "executor_use": busy / capacity,
        },
        "workers": [_worker_row(report) for report in reports],
        "models": {label: _derive(model, bounds) for label, model in models.items()},
    }


def _add(total: dict[str, Any], more: Mapping[str, Any]) -> dict[str, Any]:
    added: dict[str, Any] = {}
    for key, value in total.items():
        other = more.get(key)
        if isinstance(value, dict):
            other = other if isinstance(other, dict) else {}
            added[key] = {name: value.get(name, 0.0) + other.get(name, 0.0) for name in {*value, *other}}
        elif isinstance(value, list):
            added[key] = [a + b for a, b in zip(value, other or [0] * len(value), strict=True)]
        else:
            added[key] = value + (other or 0)
    return added


def _worker_row(report: Mapping[str, Any]) -> dict[str, Any]:
    models = report["models"].values()
    return {
        "worker": report["worker"],
        "loop_lag_s": report["loop_lag_s"],
        "in_flight": report["in_flight"],
        "executor_use": float(report["busy_s_per_s"]) / max(1, int(report["executor_workers"])),
        "requests_per_s": sum(float(model["requests_per_s"]) for model in models),
    }


def _derive(model: Mapping[str, Any], bounds: tuple[float, ...]) -> dict[str, Any]:
    latency = model["latency"]
    batches = model["batches"]
    return {
        "requests_per_s": model["requests_per_s"],
        "rows_per_s": model["rows_per_s"],
        "p50_s": quantile(0.5, latency, bounds),
        "p99_s": quantile(0.99, latency, bounds),
        "mean_batch_rows": model["batch_rows"] / batches if batches else None,
        "queued_rows": model.get("queued_rows", 0),
        "shed_per_s": model["shed_per_s"],
        "requests_total": model["requests_total"],
        "shed_total": model["shed_total"],
    }


def quantile(q: float, counts: list[int], bounds: tuple[float, ...]) -> float | None:
    """The ``q`` quantile of a histogram's bucket counts, interpolated inside its bucket (as Prometheus'
    ``histogram_quantile``); None with no observation. Past the last finite bound: that bound."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    below = 0
    for index, count in enumerate(counts):
        if count and below + count >= rank:
            upper = bounds[index]
            lower = bounds[index - 1] if index > 0 else 0.0
            if math.isinf(upper):
                return lower
            return lower + (upper - lower) * (rank - below) / count
        below += count
    return bounds[-2]
