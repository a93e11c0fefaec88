"""The logger's behaviour with in-process sinks: batching, overflow, flush on close, retries, spill."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from asyncserve.exceptions import ConfigurationError, Overloaded
from asyncserve.predlog import InputPolicy, LoggerState, OverflowPolicy, PredictionLogger
from tests.predlog.conftest import FlakySink, GatedSink, MemorySink, read_jsonl, record


def accounted(log: PredictionLogger) -> bool:
    stats = log.statistics()
    return stats.accepted == stats.written + stats.spilled + stats.lost + stats.buffered


@pytest.fixture
def spill(tmp_path: Path) -> Path:
    return tmp_path / "spill.jsonl"


async def test_a_full_batch_is_written_at_once(spill: Path) -> None:
    sink = MemorySink()
    async with PredictionLogger(sink, batch_size=4, flush_interval_s=60, spill_path=spill) as log:
        for i in range(10):
            log.record(record(i))
        first, second = await sink.next_batch(), await sink.next_batch()
        assert [r["request_id"] for r in first + second] == [f"r{i}" for i in range(8)]
        assert sink.batches.empty()  # two records wait for the interval, or for the close
    assert [r["request_id"] for r in await sink.next_batch()] == ["r8", "r9"]
    assert log.statistics().written == 10


async def test_a_partial_batch_is_written_after_the_interval(spill: Path) -> None:
    sink = MemorySink()
    async with PredictionLogger(sink, batch_size=100, flush_interval_s=0.05, spill_path=spill) as log:
        started = time.monotonic()
        log.record(record(0))
        log.record(record(1))
        batch = await sink.next_batch()
        waited_s = time.monotonic() - started
    assert [r["request_id"] for r in batch] == ["r0", "r1"]
    assert 0.04 <= waited_s < 2.0


async def test_flush_writes_out_everything_accepted_so_far(spill: Path) -> None:
    sink = MemorySink()
    async with PredictionLogger(sink, batch_size=100, flush_interval_s=60, spill_path=spill) as log:
        for i in range(3):
            log.record(record(i))
        await log.flush()
        assert len(sink.stored) == 3
        await log.flush()  # nothing pending: returns at once
        assert log.statistics().buffered == 0


async def test_closing_writes_out_every_accepted_record(spill: Path) -> None:
    sink = MemorySink()
    log = PredictionLogger(sink, batch_size=7, flush_interval_s=60, spill_path=spill)
    await log.start()
    for i in range(50):
        log.record(record(i))
    await log.aclose()
    assert [r["request_id"] for r in sink.stored] == [f"r{i}" for i in range(50)]
    assert sink.closed
    assert log.statistics().written == 50
    assert accounted(log)


async def full_logger(overflow: OverflowPolicy, spill: Path) -> tuple[PredictionLogger, GatedSink]:
    """A running logger whose 5-record buffer is full: the sink holds the batch until its gate opens."""
    sink = GatedSink()
    log = PredictionLogger(sink, max_buffer=5, batch_size=5, overflow=overflow, spill_path=spill)
    await log.start()
    for i in range(5):
        log.record(record(i))
    await sink.entered.wait()
    assert log.has_room() is False
    return log, sink


async def test_a_full_buffer_drops_new_records_and_counts_them(spill: Path, caplog: pytest.LogCaptureFixture) -> None:
    log, sink = await full_logger("drop", spill)
    with caplog.at_level(logging.WARNING):
        log.record(record(5))
        log.record(record(6))
        log.check_room()  # with "drop", nothing is refused
    assert log.statistics().dropped == 2
    warnings = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
    assert warnings == [
        "prediction log gated is full (5 records): dropped 1 records since the last warning, 1 in all; "
        "the sink is falling behind"
    ]  # one warning per interval, however many drops
    sink.gate.set()
    await log.aclose()
    assert [r["request_id"] for r in sink.stored] == [f"r{i}" for i in range(5)]


async def test_a_full_buffer_refuses_with_overloaded(spill: Path) -> None:
    log, sink = await full_logger("refuse", spill)
    with pytest.raises(Overloaded, match="5 records are waiting for sink 'gated'") as refused:
        log.check_room()  # before the prediction is computed
    assert refused.value.status_code == 503
    assert refused.value.headers() == {"retry-after": "1"}
    with pytest.raises(Overloaded):
        log.record(record(5))
    assert log.statistics().refused == 2
    assert log.statistics().dropped == 0
    sink.gate.set()
    await log.flush()
    assert log.has_room()
    log.record(record(5))
    await log.aclose()
    assert [r["request_id"] for r in sink.stored] == [f"r{i}" for i in range(6)]


async def test_a_failing_sink_is_retried_until_it_recovers(spill: Path, caplog: pytest.LogCaptureFixture) -> None:
    sink = FlakySink(failures=2)
    with caplog.at_level(logging.WARNING):
        async with PredictionLogger(sink, retries=3, retry_backoff_s=0.001, spill_path=spill) as log:
            for i in range(3):
                log.record(record(i))
            await log.flush()
    stats = log.statistics()
    assert (stats.written, stats.retried, stats.failures, stats.spilled) == (3, 2, 2, 0)
    assert "prediction log sink flaky failed to write 3 records (attempt 1 of 4)" in caplog.text
    assert await read_jsonl(spill) == []


async def test_a_sink_that_keeps_failing_spills_every_record(spill: Path, caplog: pytest.LogCaptureFixture) -> None:
    sink = FlakySink(failures=None)
    with caplog.at_level(logging.WARNING):
        async with PredictionLogger(
            sink, batch_size=4, flush_interval_s=60, retries=2, retry_backoff_s=0.001, spill_path=spill
        ) as log:
            for i in range(10):
                log.record(record(i))
            await log.flush()
            # The first batch had 3 attempts; once the sink counts as failing, each batch gets one.
            assert sink.attempts == 3 + 1 + 1
    spilled = await read_jsonl(spill)
    assert [r["request_id"] for r in spilled] == [f"r{i}" for i in range(10)]
    assert log.statistics().spilled == 10
    assert log.statistics().written == 0
    assert "spilled 4 records to" in caplog.text
    assert accounted(log)


async def test_a_sink_that_hangs_times_out_and_spills(spill: Path) -> None:
    sink = GatedSink()  # never opened: every write hangs
    async with PredictionLogger(sink, retries=0, write_timeout_s=0.02, spill_path=spill) as log:
        log.record(record(0))
        await log.flush()
        assert log.statistics().spilled == 1


async def test_closing_past_its_time_limit_spills_what_is_left(spill: Path) -> None:
    sink = GatedSink()
    log = PredictionLogger(sink, batch_size=2, write_timeout_s=None, spill_path=spill)
    await log.start()
    for i in range(5):
        log.record(record(i))
    await sink.entered.wait()
    await log.aclose(timeout_s=0.01)
    assert [r["request_id"] for r in await read_jsonl(spill)] == [f"r{i}" for i in range(5)]
    assert log.statistics().spilled == 5
    assert accounted(log)


async def test_a_record_that_cannot_be_encoded_is_counted_not_raised(spill: Path) -> None:
    looped: dict[str, object] = {}
    looped["self"] = looped
    async with PredictionLogger(MemorySink(), spill_path=spill) as log:
        log.record(looped)
    assert log.statistics().invalid == 1
    assert log.statistics().accepted == 0


async def test_the_input_policy_applies_to_every_record(spill: Path) -> None:
    sink = MemorySink()
    policy = InputPolicy("hash")
    async with PredictionLogger(sink, input_policy=policy, spill_path=spill) as log:
        log.record(record(0, inputs={"ssn": "123"}))
    assert sink.stored[0]["inputs"] == policy.apply({"ssn": "123"})


async def test_the_lifecycle_is_explicit(spill: Path) -> None:
    sink = MemorySink()
    log = PredictionLogger(sink, spill_path=spill)
    with pytest.raises(RuntimeError, match="is new: records are accepted between start"):
        log.record(record(0))
    async with log:
        assert log.state is LoggerState.RUNNING
        assert sink.opened
        log.record(record(0))
        assert "accepted=1" in repr(log)
    assert log.state.value == "closed"
    with pytest.raises(RuntimeError, match="is closed"):
        log.record(record(1))
    with pytest.raises(RuntimeError, match="a logger starts once"):
        await log.start()
    await log.aclose()  # a second close is a no-op


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"max_buffer": 0}, "max_buffer must be an integer >= 1, got 0"),
        ({"max_buffer": 10, "batch_size": 20}, "batch_size must be from 1 to max_buffer=10, got 20"),
        ({"flush_interval_s": 0}, "flush_interval_s must be"),
        ({"overflow": "block"}, "overflow must be 'refuse' or 'drop', got 'block'"),
        ({"retries": -1}, "retries must be"),
    ],
)
def test_options_are_checked_when_built(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        PredictionLogger(MemorySink(), **options)  # type: ignore[arg-type]


def test_a_sink_must_keep_the_contract() -> None:
    with pytest.raises(ConfigurationError, match="sink must have name, open"):
        PredictionLogger(object())  # type: ignore[arg-type]


async def test_metrics_are_reported_per_sink_in_a_shared_registry(spill: Path) -> None:
    registry = CollectorRegistry()
    first, second = MemorySink("first"), FlakySink(failures=None, name="second")
    async with (
        PredictionLogger(first, registry=registry, spill_path=spill) as one,
        PredictionLogger(second, registry=registry, retries=0, spill_path=spill) as two,
    ):
        for i in range(3):
            one.record(record(i))
            two.record(record(i))
        await one.flush()
        await two.flush()

    def sample(name: str, sink: str, outcome: str | None = None) -> float | None:
        labels = {"sink": sink} | ({"outcome": outcome} if outcome else {})
        return registry.get_sample_value(name, labels)

    assert sample("asyncserve_predlog_records_total", "first", "accepted") == 3
    assert sample("asyncserve_predlog_records_total", "first", "written") == 3
    assert sample("asyncserve_predlog_records_total", "second", "spilled") == 3
    assert sample("asyncserve_predlog_failures_total", "second") == 1
    assert sample("asyncserve_predlog_buffered", "first") == 0
    assert sample("asyncserve_predlog_write_seconds_count", "first") == 1
