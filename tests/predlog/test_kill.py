"""Killing the sink's server mid-run loses nothing the logger accepted, and stores nothing twice.

The test runs its own redis-server on an ephemeral port, with an append-only file fsynced on
every write: whatever Redis acknowledged survives ``kill -9``, so after a restart the stream
holds exactly what the sink stored. What the sink could not store is spilled, and replayed once
the server is back; a batch whose reply was lost in the kill is in the stream and in the spill
file, and the replay must not add it twice. So once the replay is done, the stream holds every
accepted record exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import redis.asyncio

from asyncserve.exceptions import Overloaded
from asyncserve.predlog import LogRecord, PredictionLogger, RedisStreamSink
from tests.predlog.conftest import read_jsonl, read_stream, record, until

pytestmark = pytest.mark.redis


@pytest.fixture
def redis_server_program() -> str:
    """The redis-server program: missing, the test is skipped, or fails under CI=true (like tests/backends.py)."""
    program = shutil.which("redis-server")
    if program is None:
        if os.environ.get("CI") == "true":
            pytest.fail("redis-server is not installed; CI must have it")
        pytest.skip("needs the redis-server program")
    return program


class WatchedRedisSink(RedisStreamSink):
    """A real RedisStreamSink that lets the test wait for its next successful or failed write."""

    def __init__(self, url: str) -> None:
        super().__init__(url, stream="predictions", maxlen=None)
        self.successes = self.failures = 0
        self.changed = asyncio.Event()

    async def write(self, records: Sequence[LogRecord]) -> None:
        try:
            await super().write(records)
        except Exception:
            self.failures += 1
            raise
        else:
            self.successes += 1
        finally:
            self.changed.set()

    async def until(self, successes: int = 0, failures: int = 0) -> None:
        async with asyncio.timeout(5):
            while self.successes < successes or self.failures < failures:
                self.changed.clear()
                await self.changed.wait()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def redis_server(program: str, port: int, directory: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """redis-server on ``port``, persisting to an append-only file in ``directory``; killed on exit."""
    process = await asyncio.create_subprocess_exec(
        program, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
        "--save", "", "--appendonly", "yes", "--appendfsync", "always", "--logfile", "",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    output = process.stdout
    assert output is not None
    async with asyncio.timeout(10):
        while b"Ready to accept connections" not in (line := await output.readline()):
            assert line, "redis-server exited before it was ready"
    # Keep reading its log, so that a full pipe never stalls it.
    draining = asyncio.create_task(output.read())
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()
        await draining


async def test_killing_the_sink_server_mid_run_loses_nothing_accepted(
    tmp_path: Path, redis_server_program: str
) -> None:
    port = await asyncio.to_thread(free_port)
    url = f"redis://127.0.0.1:{port}/0"
    sink = WatchedRedisSink(url)
    spill = tmp_path / "spill.jsonl"
    log = PredictionLogger(
        sink, batch_size=20, flush_interval_s=0.005, overflow="refuse",
        retries=1, retry_backoff_s=0.01, write_timeout_s=2.0, spill_path=spill, replay_interval_s=0.05,
    )  # fmt: skip
    accepted: list[str] = []
    stop = asyncio.Event()

    async def produce() -> None:
        index = 0
        while not stop.is_set():
            for _ in range(5):
                with contextlib.suppress(Overloaded):
                    log.record(record(index))
                    accepted.append(f"r{index}")
                index += 1
            await asyncio.sleep(0.0005)

    async with redis_server(redis_server_program, port, tmp_path) as first:
        await log.start()
        producer = asyncio.create_task(produce())
        await sink.until(successes=10)
        first.kill()  # kill -9, with writes under way
        await first.wait()
    await sink.until(failures=sink.failures + 2)  # a batch failed twice, and was spilled

    async with redis_server(redis_server_program, port, tmp_path):  # the same port and files: Redis replays its AOF
        await sink.until(successes=sink.successes + 10)  # the sink recovered by itself
        stop.set()
        await producer
        await log.flush()
        await until(lambda: log.statistics().replayed >= log.statistics().spilled)
        await log.aclose()
        client = redis.asyncio.Redis.from_url(url)
        in_stream = [entry["request_id"] for entry in await read_stream(client, "predictions")]
        await client.aclose()

    stats = log.statistics()
    assert stats.accepted == len(accepted) == stats.written + stats.spilled
    assert stats.lost == stats.buffered == 0
    assert stats.spilled == stats.replayed > 0
    assert sorted(in_stream) == sorted(accepted)  # every record once: none lost, none doubled
    assert accepted[0] in in_stream[:20]  # written before the kill
    assert not await read_jsonl(spill)
    assert not await asyncio.to_thread(lambda: list(tmp_path.glob("spill.jsonl*")))  # replayed, and gone
