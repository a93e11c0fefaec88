"""Log lines as an operator reads them: ``asyncserve serve --log-format json`` writes one JSON object a line."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from asyncserve.config import Settings
from asyncserve.exceptions import ConfigurationError
from asyncserve.logs import JsonFormatter
from tests.processes import REPO, free_port

pytestmark = pytest.mark.e2e


@asynccontextmanager
async def server_logging_to(stderr: Path, *options: str) -> AsyncIterator[str]:
    """``asyncserve serve tests.services:jobs OPTIONS`` with its stderr (only) in ``stderr``; stopped by SIGTERM."""
    port = free_port()
    command = [sys.executable, "-m", "asyncserve", "serve", "tests.services:jobs", "--port", str(port), *options]
    output = await asyncio.to_thread(stderr.open, "wb")
    try:
        process = await asyncio.create_subprocess_exec(
            *command, cwd=REPO, env={**os.environ, "ASYNCSERVE_JOBS": "memory://"},
            stdout=asyncio.subprocess.DEVNULL, stderr=output,
        )  # fmt: skip
    finally:
        await asyncio.to_thread(output.close)
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=url, timeout=10) as client, asyncio.timeout(30):
            while not await _ready(client):
                assert process.returncode is None, await asyncio.to_thread(stderr.read_text)
                await asyncio.sleep(0.05)
        yield url
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def _ready(client: httpx.AsyncClient) -> bool:
    try:
        return (await client.get("/v2/health/ready")).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_json_logs_give_each_request_its_id_model_status_duration_and_error_code(
    tmp_path: Path, workers: str
) -> None:
    stderr = tmp_path / "stderr.log"
    json_options = ("--log-format", "json", "--access-log", "--workers", workers)
    async with server_logging_to(stderr, *json_options) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        good = await client.post(
            "/v1/models/adder/predict", json={"a": [1, 2, 3], "b": [4, 5, 6]}, headers={"x-request-id": "good-1"}
        )
        bad = await client.post("/v1/models/adder/predict", json={"a": "x"}, headers={"x-request-id": "bad-1"})
        failed = await client.post("/v1/models/faulty/predict", json={"fail": True}, headers={"x-request-id": "f-1"})
    assert (good.status_code, bad.status_code, failed.status_code) == (200, 422, 500)
    lines = [orjson.loads(line) for line in (await asyncio.to_thread(stderr.read_text)).splitlines()]
    assert lines, "the server logged nothing"
    for line in lines:
        assert {"timestamp", "level", "logger", "message"} <= line.keys(), line
        assert line["timestamp"].endswith("Z")
    access = {line["request_id"]: line for line in lines if line["logger"] == "asyncserve.access"}
    assert access["good-1"]["status"] == 200
    assert access["good-1"]["model"] == "adder"
    assert access["good-1"]["method"] == "POST"
    assert access["good-1"]["duration_ms"] > 0
    assert "code" not in access["good-1"]
    assert (access["bad-1"]["status"], access["bad-1"]["code"]) == (422, bad.json()["code"])
    assert (access["f-1"]["status"], access["f-1"]["code"]) == (500, "model_error")
    errors = [line for line in lines if line["level"] == "ERROR" and line.get("request_id") == "f-1"]
    assert len(errors) == 1
    assert (errors[0]["model"], errors[0]["code"]) == ("faulty", "model_error")
    assert "secret internal detail" in errors[0]["exception"]  # the traceback stays in the log
    assert {line["logger"] for line in lines} > {"asyncserve.access"}  # start-up lines too


async def test_text_stays_the_default(tmp_path: Path) -> None:
    stderr = tmp_path / "stderr.log"
    async with server_logging_to(stderr, "--access-log") as url, httpx.AsyncClient(base_url=url) as client:
        await client.get("/v2/health/live", headers={"x-request-id": "live-1"})
    text = await asyncio.to_thread(stderr.read_text)
    assert '"GET /v2/health/live" 200' in text
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(text.splitlines()[0])


def test_the_log_format_is_a_setting_and_a_variable() -> None:
    assert Settings.from_env({"ASYNCSERVE_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ConfigurationError, match="setting log_format must be 'text' or 'json', got 'xml'"):
        Settings.from_env({"ASYNCSERVE_LOG_FORMAT": "xml"})


def test_a_json_line_keeps_the_extra_fields_of_the_call_and_drops_none() -> None:
    record = logging.LogRecord("asyncserve.x", logging.WARNING, __file__, 1, "rows %d", (3,), None)
    record.__dict__.update({"model": "iris", "status": 503, "code": None})
    line: dict[str, Any] = orjson.loads(JsonFormatter().format(record))
    assert line["message"] == "rows 3"
    assert (line["level"], line["logger"], line["model"], line["status"]) == ("WARNING", "asyncserve.x", "iris", 503)
    assert "code" not in line
