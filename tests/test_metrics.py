"""The event loop's lock-free metrics expose what prometheus_client's own would; merging workers' loses nothing."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from asyncserve.metrics import LATENCY_BUCKETS_S, LoopCounter, LoopHistogram
from asyncserve.runtime.peers import MetricsPeers, WorkerGroup, merge


def exposition_lines(registry: CollectorRegistry) -> list[str]:
    # prometheus_client's own counter and histogram add a "_created" sample; the loop's do not.
    return [line for line in generate_latest(registry).decode().splitlines() if "_created" not in line]


def test_loop_histogram_and_counter_match_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    histogram = LoopHistogram("h_seconds", "A histogram.", ["route"], buckets=LATENCY_BUCKETS_S, registry=ours)
    reference = Histogram("h_seconds", "A histogram.", ["route"], buckets=LATENCY_BUCKETS_S, registry=theirs)
    counter = LoopCounter("c", "A counter.", ["route", "status"], registry=ours)
    reference_counter = Counter("c", "A counter.", ["route", "status"], registry=theirs)
    rng = random.Random(7)
    # Each bound falls in its own bucket (le: less than or equal).
    values = [*LATENCY_BUCKETS_S, 0.0, 31.0, *(rng.expovariate(20.0) for _ in range(500))]
    for value in values:
        route = rng.choice(["a", "b"])
        histogram.labels(route).observe(value)
        reference.labels(route).observe(value)
        counter.labels(route, "200").inc()
        reference_counter.labels(route, "200").inc()
    assert exposition_lines(ours) == exposition_lines(theirs)


def test_merging_workers_expositions_keeps_every_sample_and_labels_it_with_its_worker() -> None:
    workers = [CollectorRegistry(), CollectorRegistry()]
    for index, registry in enumerate(workers):
        histogram = LoopHistogram("h_seconds", "A histogram.", ["route"], buckets=LATENCY_BUCKETS_S, registry=registry)
        counter = LoopCounter("c", "A counter.", ["route"], registry=registry)
        for value in (0.001, 0.2, 3.0)[: index + 2]:
            histogram.labels("a").observe(value)
            counter.labels("a").inc()
    texts = {index: generate_latest(registry) for index, registry in enumerate(workers)}
    merged = families_by_name(merge(texts, missing=1))
    for index, text in texts.items():
        for name, family in families_by_name(text).items():
            assert merged[name].type == family.type
            assert merged[name].documentation == family.documentation
            ours = [s for s in merged[name].samples if s.labels["worker"] == str(index)]
            assert [s._replace(labels={**s.labels, "worker": ""}) for s in ours] == [
                s._replace(labels={**s.labels, "worker": ""}) for s in family.samples
            ]
    assert [s.value for s in merged["asyncserve_metrics_workers_missing"].samples] == [1.0]


def families_by_name(text: bytes) -> dict[str, Metric]:
    return {family.name: family for family in text_string_to_metric_families(text.decode())}


async def test_a_worker_that_cannot_listen_for_its_peers_still_serves_its_own_metrics(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    deep = tmp_path / ("d" * 120)  # longer than a Unix socket path may be
    await asyncio.to_thread(deep.mkdir)
    peers = MetricsPeers(WorkerGroup(deep, index=0, size=2), lambda: b"# TYPE up gauge\nup 1.0\n")
    await peers.start()
    try:
        text = (await peers.exposition()).decode()
    finally:
        await peers.aclose()
    assert 'up{worker="0"} 1.0' in text
    assert "asyncserve_metrics_workers_missing 1.0" in text
    assert "worker 0 cannot give its metrics to the others" in caplog.text
