"""The prediction log's Prometheus metrics (to move into ``asyncserve/metrics.py`` with the others).

Each registry gets the metric families once, so several loggers (one per sink) can share an
app's registry; their series differ by the ``sink`` label.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

OUTCOMES = ("accepted", "written", "spilled", "replayed", "lost", "dropped", "refused", "invalid")
"""``accepted``: taken into the buffer; ``written``: stored by the sink; ``spilled``: sent to the
spill file (the sink failed, or timed out, or was failing); ``replayed``: taken from the spill
file and stored by the sink; ``lost``: the spill failed too; ``dropped``: the buffer was full
(overflow ``"drop"``); ``refused``: the buffer was full (overflow ``"refuse"``, 503);
``invalid``: the record could not be encoded as JSON."""
WRITE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _Families:
    def __init__(self, registry: CollectorRegistry) -> None:
        # Imported here: importing asyncserve.predlog must stay light (habit 4).
        from prometheus_client import Counter, Gauge, Histogram

        self.records = Counter(
            "asyncserve_predlog_records", "Prediction-log records, by sink and outcome: " + ", ".join(OUTCOMES) + ".",
            ["sink", "outcome"], registry=registry,
        )  # fmt: skip
        self.failures = Counter(
            "asyncserve_predlog_failures", "Failed prediction-log sink writes (each attempt counts).",
            ["sink"], registry=registry,
        )  # fmt: skip
        self.buffered = Gauge(
            "asyncserve_predlog_buffered", "Prediction-log records accepted and not yet stored.",
            ["sink"], registry=registry,
        )  # fmt: skip
        self.write_seconds = Histogram(
            "asyncserve_predlog_write_seconds", "Time one successful prediction-log sink write took, in seconds.",
            ["sink"], buckets=WRITE_BUCKETS_S, registry=registry,
        )  # fmt: skip


_FAMILIES: weakref.WeakKeyDictionary[CollectorRegistry, _Families] = weakref.WeakKeyDictionary()


class SinkMeter:
    """The metrics of one sink, labels bound once (``count`` runs for every record); a no-op without a registry."""

    def __init__(self, registry: CollectorRegistry | None, sink: str, buffered: Callable[[], int]) -> None:
        self._records: dict[str, Counter] = {}
        self._failures: Counter | None = None
        self._write_seconds: Histogram | None = None
        if registry is None:
            return
        families = _FAMILIES.get(registry)
        if families is None:
            families = _FAMILIES[registry] = _Families(registry)
        self._records = {outcome: families.records.labels(sink, outcome) for outcome in OUTCOMES}
        self._failures = families.failures.labels(sink)
        self._write_seconds = families.write_seconds.labels(sink)
        gauge: Gauge = families.buffered.labels(sink)
        gauge.set_function(buffered)

    def count(self, outcome: str, records: int = 1) -> None:
        counter = self._records.get(outcome)
        if counter is not None:
            counter.inc(records)

    def failure(self) -> None:
        if self._failures is not None:
            self._failures.inc()

    def write_time(self, seconds: float) -> None:
        if self._write_seconds is not None:
            self._write_seconds.observe(seconds)
