"""Records: the input policy, the JSON encoding (NumPy, bytes, anything), and the frozen LogRecord."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime

import numpy as np
import orjson
import pytest

from asyncserve.exceptions import ConfigurationError
from asyncserve.predlog import InputPolicy, LogRecord, prediction_record
from asyncserve.predlog.records import dumps


def test_full_keeps_the_inputs() -> None:
    inputs = {"age": 42}
    assert InputPolicy().apply(inputs) is inputs


def test_hash_is_the_sha256_of_the_canonical_json() -> None:
    policy = InputPolicy("hash")
    digest = policy.apply({"b": [1, 2], "a": "x"})
    assert digest == policy.apply({"a": "x", "b": np.array([1, 2])})
    assert digest == {"sha256": hashlib.sha256(b'{"a":"x","b":[1,2]}').hexdigest()}
    assert digest != policy.apply({"a": "y", "b": [1, 2]})


def test_redact_hides_named_fields_at_any_depth_and_named_v2_tensors() -> None:
    policy = InputPolicy("redact", frozenset({"email", "ssn"}))
    inputs = {
        "email": "a@b.c",
        "rows": [{"ssn": "123", "age": 4}],
        "inputs": [{"name": "ssn", "datatype": "BYTES", "data": ["123"]}, {"name": "age", "data": [4]}],
    }
    assert policy.apply(inputs) == {
        "email": "<redacted>",
        "rows": [{"ssn": "<redacted>", "age": 4}],
        "inputs": [{"name": "ssn", "datatype": "BYTES", "data": "<redacted>"}, {"name": "age", "data": [4]}],
    }
    assert inputs["email"] == "a@b.c"  # the caller's object is left alone


@pytest.mark.parametrize(
    ("mode", "fields", "message"),
    [
        ("redact", frozenset(), "needs redact_fields"),
        ("encrypt", frozenset(), "'full', 'hash' or 'redact'"),
        ("redact", {"email"}, "must be a frozenset"),
    ],
)
def test_a_bad_policy_says_what_to_write(mode: str, fields: frozenset[str], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        InputPolicy(mode, fields)  # type: ignore[arg-type]


def test_numpy_bytes_and_odd_objects_always_encode() -> None:
    value = {
        "contiguous": np.arange(4, dtype=np.float32).reshape(2, 2),
        "transposed": np.arange(4).reshape(2, 2).T,
        "scalar": np.float64(0.5),
        "int": np.int8(-3),
        "complex": np.array([1 + 2j]),
        "strings": np.array(["a", "b"]),
        "bytes": b"\x00\x01",
        "set": {3},
        "other": ConfigurationError,
    }
    assert orjson.loads(dumps(value)) == {
        "contiguous": [[0.0, 1.0], [2.0, 3.0]],
        "transposed": [[0, 2], [1, 3]],
        "scalar": 0.5,
        "int": -3,
        "complex": ["(1+2j)"],
        "strings": ["a", "b"],
        "bytes": "AAE=",
        "set": [3],
        "other": "<class 'asyncserve.exceptions.ConfigurationError'>",
    }


def test_prediction_record_has_every_field_and_a_utc_time() -> None:
    fields = prediction_record(request_id="r1", model="m", version="2", inputs=[1], outputs=[2])
    assert fields.keys() == {
        "request_id", "model", "version", "time", "inputs", "features", "outputs", "latency_ms", "degraded",
    }  # fmt: skip
    moment = datetime.fromisoformat(fields["time"])
    assert moment.tzinfo == UTC
    assert len(fields["time"]) == len("2025-01-31T12:00:00.123456+00:00")


def test_a_log_record_is_a_snapshot_with_its_columns_copied_out() -> None:
    inputs = {"x": [1, 2]}
    entry = LogRecord.encode({"request_id": 7, "model": "m", "inputs": inputs}, InputPolicy())
    inputs["x"].append(3)
    assert entry["inputs"] == {"x": [1, 2]}
    assert (entry.request_id, entry.model, entry.version) == ("7", "m", "")
    assert entry.time == entry["time"]
    assert dict(entry).keys() == {"log_id", "request_id", "model", "inputs", "time"}
    assert entry.log_id == entry["log_id"]
    assert "bytes=" in repr(entry)


def test_a_log_record_applies_the_policy_and_keeps_a_given_time() -> None:
    moment = datetime(2025, 1, 31, 12, tzinfo=UTC)
    entry = LogRecord.encode({"inputs": {"ssn": "1"}, "time": moment}, InputPolicy("redact", frozenset({"ssn"})))
    assert entry["inputs"] == {"ssn": "<redacted>"}
    assert entry.time == "2025-01-31T12:00:00.000000+00:00"


def test_each_record_gets_a_unique_log_id_that_sorts_by_time() -> None:
    ids = [LogRecord.encode({"request_id": "same"}).log_id for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert all(len(log_id) == 32 and int(log_id, 16) >= 0 for log_id in ids)
    assert [log_id[:12] for log_id in ids] == sorted(log_id[:12] for log_id in ids)  # milliseconds first
    assert int(ids[0][:12], 16) == pytest.approx(datetime.now(UTC).timestamp() * 1000, abs=60_000)


def test_a_given_log_id_is_kept_and_survives_decoding() -> None:
    entry = LogRecord.encode({"log_id": "mine", "request_id": "r"})
    again = LogRecord.decode(entry.json)
    assert (entry.log_id, again.log_id, again.request_id, again.time) == ("mine", "mine", "r", entry.time)
    assert next(iter(again)) == "log_id"


def test_a_line_without_log_id_gets_the_hash_of_its_content() -> None:
    line = orjson.dumps({"request_id": "r", "model": "m"})
    assert LogRecord.decode(line).log_id == hashlib.sha256(line).hexdigest()[:32]
    with pytest.raises(ValueError, match="a log record is a JSON object, got list"):
        LogRecord.decode(b"[1]")
