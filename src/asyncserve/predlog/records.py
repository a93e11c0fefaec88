"""What one logged prediction is: the record's fields, the input policy, and its JSON encoding.

A record is encoded to JSON the moment the logger accepts it. That snapshot is what every sink
writes (and what the spill file keeps), so a caller that later mutates its inputs or reuses an
array cannot change a record already accepted, and the writer never touches caller objects.

Each record gets a unique ``log_id`` then, which travels with it through retries, the spill file
and its replay: the sinks store a record once per ``log_id`` (a unique key, a dedup set), so a
batch written again after a timeout whose write did land in the end is not stored twice.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from time import time_ns
from typing import Any, Literal

import orjson

from asyncserve.exceptions import ConfigurationError

InputMode = Literal["full", "hash", "redact"]
_INPUT_MODES = ("full", "hash", "redact")
REDACTED = "<redacted>"

_OPTIONS = orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS
_CANONICAL = _OPTIONS | orjson.OPT_SORT_KEYS


def utc_now() -> str:
    """The current time as UTC ISO 8601 with microseconds: ``2025-01-31T12:00:00.123456+00:00``."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def new_log_id() -> str:
    """A unique record id that sorts by time: 12 hex digits of Unix milliseconds, then 80 random bits.

    Sorting by time keeps a database's unique index appending at its end, and lets the Redis sink
    group ids by the time they were made (``log_id[:TIME_BUCKET_DIGITS]``).
    """
    return f"{time_ns() // 1_000_000:012x}{os.urandom(10).hex()}"


def _content_id(json: bytes) -> str:
    """The id of a record that came without one (a spill file of an older version): its content's hash."""
    return hashlib.sha256(json).hexdigest()[:32]


def _default(obj: Any) -> Any:
    """Encode what orjson cannot: a log record must always serialize, whatever a model returned."""
    if isinstance(obj, bytes | bytearray | memoryview):
        return base64.b64encode(obj).decode("ascii")
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        # NumPy arrays orjson refuses (non-contiguous, object or complex dtypes), NumPy scalars,
        # and the tensors of other libraries.
        return tolist()
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    return str(obj)


def dumps(value: Any, *, canonical: bool = False) -> bytes:
    """JSON bytes for ``value``: NumPy arrays and scalars as numbers, bytes as base64, others as ``str``.

    ``canonical=True`` sorts keys, so equal values give equal bytes (what input hashing needs).
    """
    return orjson.dumps(value, default=_default, option=_CANONICAL if canonical else _OPTIONS)


@dataclass(frozen=True, slots=True)
class InputPolicy:
    """How a record's ``inputs`` are kept: in full, as a SHA-256 hash, or with named fields redacted.

    Redaction replaces, at any depth, the value of every mapping key named in ``redact_fields``,
    and the ``data`` of every Open Inference Protocol tensor (``{"name": ..., "data": ...}``)
    whose name is listed.

    Example::

        InputPolicy()                                        # inputs kept as they are
        InputPolicy("hash")                                  # {"sha256": "9f86d08..."}
        InputPolicy("redact", frozenset({"email", "ssn"}))   # {"email": "<redacted>", ...}
    """

    mode: InputMode = "full"
    redact_fields: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.mode not in _INPUT_MODES:
            raise ConfigurationError(f"input policy mode must be 'full', 'hash' or 'redact', got {self.mode!r}")
        if not isinstance(self.redact_fields, frozenset):
            raise ConfigurationError(
                f"redact_fields must be a frozenset of field names, got {type(self.redact_fields).__name__}; "
                "write frozenset({'email'})"
            )
        if self.mode == "redact" and not self.redact_fields:
            raise ConfigurationError("input policy 'redact' needs redact_fields, the names of the fields to hide")

    def apply(self, inputs: Any) -> Any:
        """Return ``inputs`` as this policy logs them (never mutating the original)."""
        if self.mode == "hash":
            return {"sha256": hashlib.sha256(dumps(inputs, canonical=True)).hexdigest()}
        if self.mode == "redact":
            return _redact(inputs, self.redact_fields)
        return inputs


def _redact(value: Any, fields: frozenset[str]) -> Any:
    if isinstance(value, Mapping):
        tensor_hidden = value.get("name") in fields and "data" in value
        return {
            key: REDACTED if key in fields or (tensor_hidden and key == "data") else _redact(item, fields)
            for key, item in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(item, fields) for item in value]
    return value


def prediction_record(
    *,
    request_id: str,
    model: str,
    version: str,
    inputs: Any,
    outputs: Any,
    features: Mapping[str, Any] | None = None,
    latency_ms: Mapping[str, float] | None = None,
    degraded: bool = False,
    time: str | None = None,
) -> dict[str, Any]:
    """The record of one prediction, in the shape every sink stores.

    ``latency_ms`` holds one duration per stage (``{"features": 1.2, "model": 8.5}``);
    ``degraded`` says a fallback answered (a feature default, a partial ensemble). The logger
    applies its :class:`InputPolicy` to ``inputs`` and stamps ``time`` when it is missing.

    Example::

        logger.record(prediction_record(
            request_id="4f2a", model="churn", version="3", inputs={"age": 42},
            outputs={"p": 0.91}, latency_ms={"model": 8.5},
        ))
    """
    return {
        "request_id": request_id,
        "model": model,
        "version": version,
        "time": time or utc_now(),
        "inputs": inputs,
        "features": dict(features) if features is not None else None,
        "outputs": outputs,
        "latency_ms": dict(latency_ms) if latency_ms is not None else {},
        "degraded": degraded,
    }


class LogRecord(Mapping[str, Any]):
    """One accepted record, frozen as JSON: what a sink receives.

    ``json`` is the record's encoding (one line of a JSON Lines file, one Redis field, one JSONB
    value), and ``log_id``, ``request_id``, ``model``, ``version`` and ``time`` are copied out for
    the sinks that store them as columns. As a mapping it reads the decoded JSON, for sinks of
    your own. ``log_id`` is unique per record: a sink that stores a record at most once per
    ``log_id`` makes its writes safe to repeat. Without one, the hash of ``json`` stands in.
    """

    __slots__ = ("_decoded", "json", "log_id", "model", "request_id", "time", "version")

    def __init__(self, json: bytes, *, request_id: str, model: str, version: str, time: str, log_id: str = "") -> None:
        self.json = json
        self.log_id = log_id or _content_id(json)
        self.request_id = request_id
        self.model = model
        self.version = version
        self.time = time
        self._decoded: dict[str, Any] | None = None

    @classmethod
    def encode(cls, record: Mapping[str, Any], policy: InputPolicy = InputPolicy()) -> LogRecord:
        """Apply ``policy`` to the record's inputs, give it a ``log_id`` and a time if missing, and encode it."""
        fields = {"log_id": new_log_id(), **record}
        if "inputs" in fields and policy.mode != "full":
            fields["inputs"] = policy.apply(fields["inputs"])
        time = fields.get("time")
        if isinstance(time, datetime):
            fields["time"] = time.isoformat(timespec="microseconds")
        elif not time:
            fields["time"] = utc_now()
        return cls._of(dumps(fields), fields)

    @classmethod
    def decode(cls, json: bytes) -> LogRecord:
        """The record a line of JSON holds (one line of the spill file, say).

        Raises:
            ValueError: the line is not a JSON object.
        """
        fields = orjson.loads(json)
        if not isinstance(fields, dict):
            raise ValueError(f"a log record is a JSON object, got {type(fields).__name__}")
        entry = cls._of(json, fields)
        entry._decoded = fields
        return entry

    @classmethod
    def _of(cls, json: bytes, fields: Mapping[str, Any]) -> LogRecord:
        return cls(
            json,
            log_id=_text(fields.get("log_id")),
            request_id=_text(fields.get("request_id")),
            model=_text(fields.get("model")),
            version=_text(fields.get("version")),
            time=_text(fields.get("time")),
        )

    def _fields(self) -> dict[str, Any]:
        if self._decoded is None:
            self._decoded = orjson.loads(self.json)
        return self._decoded

    def __getitem__(self, key: str) -> Any:
        return self._fields()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields())

    def __len__(self) -> int:
        return len(self._fields())

    def __repr__(self) -> str:
        return (
            f"<LogRecord log_id={self.log_id!r} request_id={self.request_id!r} model={self.model!r} "
            f"bytes={len(self.json)}>"
        )


def _text(value: Any) -> str:
    return "" if value is None else str(value)
