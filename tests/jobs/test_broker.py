"""The contract's own pieces, with no broker: job requests, jobs, ids and ``open_broker(url)``."""

from __future__ import annotations

import sys
from dataclasses import fields
from pathlib import Path

import pytest

from asyncserve.exceptions import ConfigurationError, InvalidRequest
from asyncserve.jobs import Broker, Job, JobRequest, JobStatus, MemoryBroker, RedisBroker, SQLiteBroker, open_broker
from asyncserve.jobs.broker import is_job_id, new_job_id
from asyncserve.jobs.keys import JOB_FIELDS


def test_job_fields_are_the_shared_field_names() -> None:
    assert tuple(field.name for field in fields(Job)) == JOB_FIELDS


def test_job_ids_sort_by_creation_and_never_repeat() -> None:
    ids = [new_job_id() for _ in range(10_000)]

    assert ids == sorted(ids)
    assert len(set(ids)) == len(ids)
    assert all(is_job_id(job_id) for job_id in ids)


def test_a_job_round_trips_through_its_dict() -> None:
    job = Job(id=new_job_id(), model="churn", inputs={"a": [1]}, status=JobStatus.FAILED, error="boom",
              dead_letter=True, webhook_attempts=({"attempt": 1},), created_at=1.0, updated_at=2.0,
              not_before=1.0, finished_at=2.0, ttl_s=10.0)  # fmt: skip

    as_dict = job.to_dict()

    assert as_dict["status"] == "failed"
    assert as_dict["webhook_attempts"] == [{"attempt": 1}]
    assert Job.from_dict(as_dict) == job
    assert job.expires_at == 12.0
    assert JobStatus.FAILED.is_final
    assert not JobStatus.RUNNING.is_final


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model": ""}, "model must be a model name"),
        ({"model": "a b"}, "model must be a model name"),
        ({"priority": 10}, "priority must be an integer from 0 to 9, got 10"),
        ({"priority": True}, "priority must be an integer from 0 to 9, got True"),
        ({"max_attempts": 0}, "max_attempts must be an integer from 1 to 100, got 0"),
        ({"max_attempts": 10**9}, "max_attempts must be an integer from 1 to 100, got 1000000000"),
        ({"ttl_s": 0}, "ttl_s must be a number of seconds > 0 and at most 3.16224e[+]07 [(]a year[)], got 0"),
        ({"ttl_s": 1e308}, "ttl_s must be a number of seconds > 0 and at most"),
        ({"queue_timeout_s": 1e308}, "queue_timeout_s must be a number of seconds > 0 and at most"),
        ({"ttl_s": float("nan")}, "ttl_s must be a number of seconds > 0"),
        ({"queue_timeout_s": -1}, "queue_timeout_s must be a number of seconds > 0 and at most .*, or None"),
        ({"idempotency_key": ""}, "idempotency_key must be a printable string of 1 to 2048 characters"),
        ({"webhook": 7}, "webhook must be a printable string"),
        ({"owner": ""}, "owner must be a printable string of 1 to 200 characters, or None, got ''"),
        ({"owner": "x" * 201}, "owner must be a printable string of 1 to 200 characters"),
        ({"owner": "a\nb"}, "owner must be a printable string"),
        ({"owner": 7}, "owner must be a printable string of 1 to 200 characters, or None, got 7"),
        ({"inputs": {1, 2}}, "inputs must be JSON-serialisable"),
    ],
)
def test_a_bad_job_request_says_which_rule_it_breaks(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidRequest, match=message):
        JobRequest(**{"model": "churn", "inputs": None, **fields})  # type: ignore[arg-type]


def test_open_broker_picks_the_backend_by_scheme(tmp_path: Path) -> None:
    memory = open_broker("memory://?max_queued=5")
    sqlite = open_broker(f"sqlite://{tmp_path}/jobs.db?keep_expired_s=60")
    relative = open_broker("sqlite://var/jobs.db")
    redis = open_broker("redis://cache:6379/2?prefix=tenant-a&max_queued=none&max_connections=9&socket_timeout=5")

    assert isinstance(memory, MemoryBroker)
    assert memory.max_queued == 5
    assert isinstance(sqlite, SQLiteBroker)
    assert sqlite.path == tmp_path / "jobs.db"
    assert sqlite.keep_expired_s == 60
    assert isinstance(relative, SQLiteBroker)
    assert relative.path == Path("var/jobs.db")
    assert isinstance(redis, RedisBroker)
    assert (redis.prefix, redis.url, redis.max_queued) == ("tenant-a", "redis://cache:6379/2?socket_timeout=5", None)
    assert redis.max_connections == 9
    assert all(isinstance(broker, Broker) for broker in (memory, sqlite, redis))


def test_open_broker_refuses_what_it_cannot_serve() -> None:
    with pytest.raises(ConfigurationError, match=r"no job broker for 'kafka://x'; the supported URLs are: memory://"):
        open_broker("kafka://x")
    with pytest.raises(ConfigurationError, match="names no file"):
        open_broker("sqlite://")
    with pytest.raises(ConfigurationError, match="max_queued must be a whole number, got 'lots'"):
        open_broker("memory://?max_queued=lots")
    with pytest.raises(ConfigurationError, match="has options that sqlite does not take: 'prefix=x'"):
        open_broker("sqlite:///var/jobs.db?prefix=x")
    with pytest.raises(ConfigurationError, match="max_connections must be a whole number"):
        open_broker("redis://cache:6379/0?max_connections=many")


def test_the_redis_broker_without_redis_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setitem(sys.modules, "redis.asyncio", None)

    with pytest.raises(ConfigurationError, match=r"pip install 'asyncserve\[redis\]'"):
        open_broker("redis://127.0.0.1:6379/0")


async def test_a_broker_must_be_opened_before_use() -> None:
    broker = MemoryBroker()

    with pytest.raises(RuntimeError, match=r"is not open; use 'async with broker:' or call open\(\) first"):
        await broker.get("0" * 32)
    async with broker:
        with pytest.raises(RuntimeError, match="is already open"):
            await broker.open()
