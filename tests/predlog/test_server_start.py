"""A server whose prediction-log store is down starts, is ready, answers, and logs once the store is up."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

import pytest
import redis.asyncio

from asyncserve import Service, Settings
from tests.conftest import serving
from tests.models import Echo
from tests.predlog.conftest import read_stream, until
from tests.predlog.proxy import FreezableProxy, free_port

pytestmark = pytest.mark.redis


async def test_a_server_starts_ready_while_its_log_store_is_down(
    redis_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = await asyncio.to_thread(free_port)
    stream = f"asyncserve:test:server:{uuid.uuid4().hex[:12]}"
    settings = Settings(
        executor_workers=1, loop_lag_interval_s=0.01, jobs="memory://",
        prediction_log=f"redis://127.0.0.1:{port}/0?stream={stream}",
        prediction_log_spill=str(tmp_path / "spill.jsonl"),
    )  # fmt: skip
    proxy = FreezableProxy(("127.0.0.1", 6379))
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        with caplog.at_level(logging.WARNING):
            async with serving(Service(Echo()), settings) as running, running.client() as http:
                assert (await http.get("/v2/health/ready")).status_code == 200
                for i in range(5):
                    answer = await http.post(
                        "/v1/models/shout/predict", json={"text": "x"}, headers={"X-Request-ID": f"q{i}"}
                    )
                    assert answer.status_code == 200
                await proxy.start(port)  # the store is up

                async def logged() -> bool:
                    return await client.xlen(stream) >= 5

                await until(logged)
        stored = await read_stream(client, stream)
    finally:
        await proxy.stop()
        await client.delete(stream, *await client.keys(f"{stream}:*"))
        await client.aclose()

    assert sorted(entry["request_id"] for entry in stored) == [f"q{i}" for i in range(5)]
    assert f"prediction log sink redis:{stream} is unreachable" in caplog.text
