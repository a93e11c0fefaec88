"""The logger's behaviour with in-process sinks: batching, overflow, flush on close, retries, spill, replay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry

from asyncserve.exceptions import ConfigurationError, Overloaded
from asyncserve.predlog import InputPolicy, LoggerState, LogRecord, OverflowPolicy, PredictionLogger, delivery
from asyncserve.predlog import logger as logger_module
from tests.predlog.conftest import FlakySink, GatedSink, MemorySink, read_jsonl, record, until


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
            sink, batch_size=4, flush_interval_s=60, retries=2, retry_backoff_s=0.001, spill_path=spill,
            replay_interval_s=60,
        ) as log:  # fmt: skip
            for i in range(10):
                log.record(record(i))
            await log.flush()
            # The first batch had 3 attempts; once the sink counts as failing, batches go straight to the spill
            # file, and only the replay tries the sink again (in a minute).
            assert sink.attempts == 3
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
        ({"replay_interval_s": 0}, "replay_interval_s must be a number of seconds > 0, got 0"),
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
        PredictionLogger(
            second, registry=registry, retries=0, spill_path=spill.with_name("second.jsonl"), replay_interval_s=60
        ) as two,
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


class SlowSink(MemorySink):
    """Takes ``delay_s`` per write (a sink under load)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__("slow")
        self.delay_s = delay_s

    async def write(self, records: Sequence[LogRecord]) -> None:
        await asyncio.sleep(self.delay_s)
        await super().write(records)


class CountingGatedSink(GatedSink):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    async def write(self, records: Sequence[LogRecord]) -> None:
        self.writes += 1
        await super().write(records)


class LateOpeningSink(MemorySink):
    """Refuses to open its first ``refusals`` times, as a store that is down at start-up."""

    def __init__(self, refusals: int) -> None:
        super().__init__("late")
        self.refusals = refusals

    async def open(self) -> None:
        if self.refusals:
            self.refusals -= 1
            raise ConnectionRefusedError("the store is down")
        await super().open()


async def write_spill(path: Path, lines: list[bytes]) -> None:
    await asyncio.to_thread(path.write_bytes, b"".join(line + b"\n" for line in lines))


async def test_a_hung_sink_is_not_retried_and_later_batches_skip_it(spill: Path) -> None:
    sink = CountingGatedSink()
    async with PredictionLogger(
        sink, batch_size=5, flush_interval_s=60, retries=3, write_timeout_s=0.05, spill_path=spill,
        replay_interval_s=60,
    ) as log:  # fmt: skip
        started = time.monotonic()
        for i in range(15):
            log.record(record(i))
        await log.flush()
        took_s = time.monotonic() - started
    assert sink.writes == 1  # one write, timed out; the other two batches went straight to the spill file
    assert took_s < 0.5
    assert [r["request_id"] for r in await read_jsonl(spill)] == [f"r{i}" for i in range(15)]


async def test_a_sink_call_that_ignores_cancellation_is_left_behind(
    spill: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(delivery, "CANCEL_GRACE_S", 0.05)
    sink = StubbornSink()
    async with PredictionLogger(
        sink, batch_size=5, flush_interval_s=60, write_timeout_s=0.05, replay_interval_s=0.05, spill_path=spill
    ) as log:
        for i in range(5):
            log.record(record(i))
        await log.flush()
        assert log.statistics().spilled == 5
        with caplog.at_level(logging.DEBUG):
            await asyncio.sleep(0.3)  # the replay tries again, and finds the abandoned write still running
        assert sink.writes == 1
        assert "has not ended yet" in caplog.text
        sink.release.set()  # it ends; the replay then stores the spill file
        await until(lambda: log.statistics().replayed >= 5)
    assert [r["request_id"] for r in sink.stored] == [f"r{i}" for i in range(5)]


class StubbornSink(MemorySink):
    """Its first write ignores cancellation until ``release`` is set (then fails); later writes succeed."""

    def __init__(self) -> None:
        super().__init__("stubborn")
        self.release = asyncio.Event()
        self.writes = 0

    async def write(self, records: Sequence[LogRecord]) -> None:
        self.writes += 1
        if self.writes == 1:
            while not self.release.is_set():
                with contextlib.suppress(asyncio.CancelledError):
                    await self.release.wait()
            raise ConnectionError("gave up")
        await super().write(records)


async def test_start_up_succeeds_while_the_sink_is_down_and_opens_it_later(
    spill: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sink = LateOpeningSink(refusals=2)
    with caplog.at_level(logging.WARNING):
        log = PredictionLogger(sink, flush_interval_s=0.01, replay_interval_s=0.02, spill_path=spill)
        await log.start()
    assert log.state is LoggerState.RUNNING
    assert caplog.text.count("is unreachable") == 1  # one warning, however many attempts
    log.record(record(0))
    await log.flush()
    await until(lambda: log.statistics().replayed >= 1)
    log.record(record(1))
    await log.aclose()
    assert [r["request_id"] for r in sink.stored] == ["r0", "r1"]
    stats = log.statistics()
    assert (stats.spilled, stats.replayed, stats.written) == (1, 1, 1)
    assert not await asyncio.to_thread(spill.exists)


async def test_a_spill_file_left_by_an_earlier_run_is_replayed_at_start(spill: Path) -> None:
    earlier = [LogRecord.encode(record(i)).json for i in range(7)] + [orjson.dumps(record(7))]  # one without log_id
    await write_spill(spill, earlier)
    sink = MemorySink()
    async with PredictionLogger(sink, batch_size=3, spill_path=spill) as log:
        await until(lambda: log.statistics().replayed >= 8)
    assert sorted(r["request_id"] for r in sink.stored) == [f"r{i}" for i in range(8)]
    assert log.statistics().accepted == 0
    assert await asyncio.to_thread(lambda: list(spill.parent.glob("spill.jsonl*"))) == []


async def test_the_replay_does_not_hold_up_new_records(spill: Path) -> None:
    await write_spill(spill, [LogRecord.encode(record(i)).json for i in range(2000)])
    sink = SlowSink(delay_s=0.01)
    async with PredictionLogger(sink, batch_size=100, flush_interval_s=0.01, spill_path=spill) as log:
        await asyncio.sleep(0.03)  # the replay is under way
        log.record(record(9999))
        await log.flush()
        assert log.statistics().written == 1
        assert log.statistics().replayed < 2000  # written while the replay goes on, taking turns with it
        await until(lambda: log.statistics().replayed >= 2000)
    assert len(sink.stored) == 2001


class SlowOpeningSink(MemorySink):
    """Opens only once ``ready`` is set."""

    def __init__(self) -> None:
        super().__init__("slow-open")
        self.ready = asyncio.Event()

    async def open(self) -> None:
        await self.ready.wait()
        await super().open()


async def test_a_sink_slow_to_open_opens_in_the_background_while_records_wait(
    spill: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logger_module, "START_WAIT_S", 0.05)
    sink = SlowOpeningSink()
    log = PredictionLogger(sink, flush_interval_s=0.01, write_timeout_s=5, spill_path=spill)
    started = time.monotonic()
    await log.start()
    assert time.monotonic() - started < 1.0
    log.record(record(0))
    await asyncio.sleep(0.05)
    assert log.statistics().buffered == 1  # waiting for the open, not spilled
    sink.ready.set()
    await log.flush()
    await log.aclose()
    stats = log.statistics()
    assert (stats.written, stats.spilled) == (1, 0)
    assert [r["request_id"] for r in sink.stored] == ["r0"]
