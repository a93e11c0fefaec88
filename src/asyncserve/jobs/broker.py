"""The job broker contract: what a job is, how it moves, and ``open_broker(url)``.

A job's life::

    enqueue ─► queued ──claim──► running ──complete──► succeeded
                 ▲  │              │  │
                 │  │ cancel       │  └──fail (retries left)──► queued again, after retry_in_s
                 │  ▼              │  └──fail (retries spent, or retry_in_s=None)──► failed
                 │ cancelled ◄─────┘ cancel            (its lease expires: claimed again, or failed)
                 │
    succeeded/failed/cancelled ──ttl_s later, expire()──► expired (a tombstone, then removed)
    queued past its deadline ──expire()──► expired

Every lease carries a *fencing token* that grows by one each time the job is handed to a worker.
``renew``, ``complete``, ``fail`` and ``release`` take effect only while the job is still running
under that token, so a worker that lost its lease (it stalled, the job was reclaimed or cancelled)
changes nothing: each job's result is stored exactly once.

Times are Unix seconds (``time.time()``; on Redis the server's clock). They are stored and compared
across processes and restarts, where the event loop's monotonic clock means nothing.
"""

from __future__ import annotations

import builtins
import dataclasses
import math
import re
import secrets
import time
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Protocol, Self, runtime_checkable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import orjson

from asyncserve.exceptions import ConfigurationError, InvalidRequest
from asyncserve.jobs.keys import JOB_FIELDS

if TYPE_CHECKING:
    from types import TracebackType

MAX_PRIORITY = 9
MAX_OWNER_LENGTH = 200
DEFAULT_TTL_S = 86_400.0
"""A finished job's result is kept a day unless the request says otherwise."""
DEFAULT_MAX_ATTEMPTS = 3
MAX_ATTEMPTS = 100
"""Most attempts a job may ask for: beyond, a failing job would hold its place for ever."""
MAX_TTL_S = 366 * 86_400.0
"""Longest a result may be kept, or a job wait in the queue: a year."""
DEFAULT_KEEP_EXPIRED_S = 86_400.0
"""An expired job stays readable (status ``expired``, no inputs or result) this long, then goes."""
SUPPORTED_URLS = (
    "memory://",
    "sqlite:///abs/path/jobs.db (or sqlite://relative/jobs.db)",
    "redis://host:6379/0?prefix=asyncserve (or rediss://)",
)

_COMMON_OPTIONS = ("max_queued", "keep_expired_s")
_TEXT_FIELDS = {"version": 2048, "webhook": 2048, "idempotency_key": 2048, "owner": MAX_OWNER_LENGTH}
"""JobRequest's optional strings, and the most characters each may have."""
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,199}")
_JOB_ID = re.compile(r"[0-9a-f]{32}")
_last_id = (0, 0)


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def is_final(self) -> bool:
        """Whether the job will never run again (succeeded, failed, cancelled or expired)."""
        return self not in (JobStatus.QUEUED, JobStatus.RUNNING)


def new_job_id() -> str:
    """32 hex digits: 12 of milliseconds since the epoch, then 20 random ones (like a ULID).

    Ids sort by creation time; within one process they strictly increase (a later id in the same
    millisecond adds a random step to the last one), and they stay hard to guess.
    """
    global _last_id
    ms, random_part = time.time_ns() // 1_000_000, secrets.randbits(80)
    last_ms, last_random = _last_id
    if ms <= last_ms:
        ms, random_part = last_ms, last_random + 1 + secrets.randbits(32)
    _last_id = (ms, random_part)
    return f"{ms:012x}{random_part:020x}"


def is_job_id(text: str) -> bool:
    return _JOB_ID.fullmatch(text) is not None


def dump_json(value: Any, what: str) -> bytes:
    """``value`` as JSON (NumPy arrays included), or InvalidRequest naming ``what``."""
    try:
        return orjson.dumps(value, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as exc:
        raise InvalidRequest(f"{what} must be JSON-serialisable: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class JobRequest:
    """What a client submits; validated when built (the HTTP layer turns the error into a 400).

    Example::

        JobRequest(model="churn", inputs={"age": 42}, priority=5, idempotency_key="order-17", owner="team-a")
    """

    model: str
    inputs: Any
    version: str | None = None
    priority: int = 0
    """0 to 9; higher runs first."""
    webhook: str | None = None
    idempotency_key: str | None = None
    """A second submission with this key, by the same owner, returns the first job instead of making another."""
    owner: str | None = None
    """Who submits the job (the API key's name), for per-client isolation; None: nobody in particular.

    Idempotency keys are per owner: two owners may use the same key and get two jobs."""
    ttl_s: float = DEFAULT_TTL_S
    """How long the job's result is kept after it finishes."""
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    queue_timeout_s: float | None = None
    """If the job is still queued this long after submission, it expires instead of running."""
    inputs_json: bytes = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        model_rule = "a model name (a letter or digit, then letters, digits, '_', '.' or '-', at most 200)"
        _check(_MODEL_NAME.fullmatch(str(self.model)) is not None and isinstance(self.model, str), "model", model_rule,
               self.model)  # fmt: skip
        _check(is_whole_number(self.priority) and 0 <= self.priority <= MAX_PRIORITY, "priority",
               f"an integer from 0 to {MAX_PRIORITY}", self.priority)  # fmt: skip
        _check(is_whole_number(self.max_attempts) and 1 <= self.max_attempts <= MAX_ATTEMPTS, "max_attempts",
               f"an integer from 1 to {MAX_ATTEMPTS}", self.max_attempts)  # fmt: skip
        _check(is_seconds(self.ttl_s) and 0 < self.ttl_s <= MAX_TTL_S, "ttl_s",
               f"a number of seconds > 0 and at most {MAX_TTL_S:g} (a year)", self.ttl_s)  # fmt: skip
        timeout = self.queue_timeout_s
        _check(timeout is None or (is_seconds(timeout) and 0 < timeout <= MAX_TTL_S), "queue_timeout_s",
               f"a number of seconds > 0 and at most {MAX_TTL_S:g}, or None", timeout)  # fmt: skip
        for name, longest in _TEXT_FIELDS.items():
            value = getattr(self, name)
            _check(value is None or (isinstance(value, str) and 0 < len(value) <= longest and value.isprintable()),
                   name, f"a printable string of 1 to {longest} characters, or None", value)  # fmt: skip
        object.__setattr__(self, "inputs_json", dump_json(self.inputs, "inputs"))


def _check(ok: bool, name: str, rule: str, value: object) -> None:
    if not ok:
        raise InvalidRequest(f"{name} must be {rule}, got {value!r}")


def is_whole_number(value: object) -> bool:
    """An int (not a bool): for checking values that typing cannot vouch for (a JSON body, a query)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_seconds(value: object) -> bool:
    """A finite int or float (not a bool, not NaN)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True, kw_only=True)
class Job:
    """A job as stored: a snapshot (brokers return new ``Job`` objects; this one never changes).

    ``attempts`` counts the leases granted so far (a lease that expired counts); ``started_at`` is
    when the latest attempt started. ``dead_letter`` marks a job that failed because its attempts
    ran out (each one failed or lost its lease), as opposed to one its worker declared hopeless
    (``fail(..., retry_in_s=None)``); ``error`` holds the last error either way.

    Example::

        job = await broker.get(job_id)
        if job is not None and job.status is JobStatus.SUCCEEDED:
            print(job.result)
    """

    id: str
    model: str
    version: str | None = None
    inputs: Any = None
    priority: int = 0
    status: JobStatus = JobStatus.QUEUED
    result: Any = None
    error: str | None = None
    dead_letter: bool = False
    attempts: int = 0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    webhook: str | None = None
    webhook_attempts: tuple[dict[str, Any], ...] = ()
    idempotency_key: str | None = None
    """The key as the client gave it (unique per owner, not across owners)."""
    owner: str | None = None
    """Who submitted the job (``JobRequest.owner``)."""
    created_at: float
    updated_at: float
    started_at: float | None = None
    finished_at: float | None = None
    ttl_s: float = DEFAULT_TTL_S
    not_before: float
    """The job may not be claimed before this time (retry backoff)."""
    deadline_at: float | None = None
    """A job still queued at this time expires (``queue_timeout_s`` after submission)."""
    lease_owner: str | None = None
    fencing_token: int = 0
    lease_expires_at: float | None = None

    @property
    def expires_at(self) -> float | None:
        """When a finished job's result expires."""
        return None if self.finished_at is None else self.finished_at + self.ttl_s

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (``status`` as its string), keyed by ``keys.JOB_FIELDS``."""
        fields = {name: getattr(self, name) for name in JOB_FIELDS}
        fields["status"] = self.status.value
        fields["webhook_attempts"] = list(self.webhook_attempts)
        return fields

    @classmethod
    def from_dict(cls, fields: Mapping[str, Any]) -> Self:
        """The inverse of ``to_dict`` (unknown keys are ignored)."""
        known = {name: fields[name] for name in JOB_FIELDS if name in fields}
        known["status"] = JobStatus(known["status"])
        known["webhook_attempts"] = tuple(known.get("webhook_attempts") or ())
        return cls(**known)


@dataclass(frozen=True)
class Lease:
    """A worker's hold on a running job, as ``claim`` hands it out.

    ``token`` is the fencing token: pass the lease back to ``renew``/``complete``/``fail``/``release``
    and the broker checks it. ``expires_at`` is the expiry granted by ``claim``; ``renew`` extends
    it in the broker without changing the token.
    """

    job: Job
    owner: str
    token: int
    expires_at: float

    @property
    def job_id(self) -> str:
        return self.job.id

    @classmethod
    def of(cls, job: Job) -> Self:
        """The lease a freshly claimed ``job`` carries."""
        return cls(job, job.lease_owner or "", job.fencing_token, job.lease_expires_at or job.updated_at)


@runtime_checkable
class Broker(Protocol):
    """Where jobs wait, and how workers take them: ``MemoryBroker``, ``SQLiteBroker``, ``RedisBroker``.

    Every broker is an async context manager and keeps the same contract (``tests/jobs``):

    - ``enqueue`` returns ``(job, created)``; the job is durable when it returns. A known
      ``idempotency_key`` of the same ``owner`` (None counts as one owner) returns the first job and
      ``False``, even under concurrent submits; another owner's job with that key is no match.
      ``enqueue_many`` stores all of its jobs or none. A broker built with ``max_queued`` raises
      ``Overloaded`` rather than hold more queued jobs.
    - ``list`` pages newest first; pass the returned cursor back for the next page (None: no more).
      ``status``, ``model`` and ``owner`` filter it (None: any).
    - ``claim`` first takes back jobs whose lease expired (a dead worker; the job fails with
      ``dead_letter`` if that was its last attempt), then queued jobs that are due: highest
      priority first, then the longest waiting (since submission, or since its retry fell due).
      Each gets a lease of ``lease_s``, one more attempt and a new fencing token.
    - ``renew``/``complete``/``fail``/``release`` return False and change nothing once the lease is
      stale (the job was reclaimed, cancelled or has finished). A late ``complete`` still counts
      if nobody took the job over.
    - ``fail`` retries after ``retry_in_s`` while attempts remain; with ``retry_in_s=None`` or no
      attempts left, the job fails (``dead_letter`` when its attempts ran out).
    - ``release`` hands a job back untried (graceful shutdown): queued at once, the attempt uncounted.
    - ``cancel`` stops a queued or running job; a finished job is returned unchanged.
    - ``expire`` (call it every few seconds) expires results past their TTL and queued jobs past
      their deadline, removes old tombstones, and returns how many jobs it expired.
    - ``events`` yields the job now and again whenever its status or attempt changes, until it is
      final (or gone) or the broker closes. Changes faster than the reader may be merged; the
      final state never is. It is an async generator: ``aclose()`` it when its reader goes away.

    Example::

        async with open_broker("sqlite:///var/jobs.db") as broker:
            job, created = await broker.enqueue(JobRequest(model="churn", inputs={"age": 42}))
            for lease in await broker.claim("worker-1", limit=8, lease_s=30):
                await broker.complete(lease, {"p": 0.91})
    """

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def enqueue(self, request: JobRequest) -> tuple[Job, bool]: ...

    async def enqueue_many(self, requests: Sequence[JobRequest]) -> builtins.list[Job]: ...

    async def get(self, job_id: str) -> Job | None: ...

    async def list(
        self,
        *,
        status: JobStatus | str | None = None,
        model: str | None = None,
        cursor: str | None = None,
        limit: int = 100,
        owner: str | None = None,
    ) -> tuple[builtins.list[Job], str | None]: ...

    async def claim(
        self, worker_id: str, *, limit: int = 1, lease_s: float = 30.0, models: Sequence[str] | None = None
    ) -> builtins.list[Lease]: ...

    async def renew(self, lease: Lease, lease_s: float) -> bool: ...

    async def complete(self, lease: Lease, result: Any) -> bool: ...

    async def fail(self, lease: Lease, error: str, *, retry_in_s: float | None) -> bool: ...

    async def release(self, lease: Lease) -> bool: ...

    async def cancel(self, job_id: str) -> Job | None: ...

    async def record_webhook_attempt(self, job_id: str, attempt: Mapping[str, Any]) -> bool: ...

    async def expire(self) -> int: ...

    def events(self, job_id: str) -> AsyncGenerator[Job, None]: ...

    async def stats(self) -> dict[str, int]: ...


def open_broker(url: str) -> Broker:
    """Build the broker a URL names (not opened yet: use ``async with`` or ``open()``).

    Example::

        open_broker("memory://")
        open_broker("sqlite:///var/lib/asyncserve/jobs.db?max_queued=100000")
        open_broker("redis://:secret@cache:6379/0?prefix=asyncserve&max_connections=100")

    Every broker takes ``max_queued`` and ``keep_expired_s``; Redis also ``prefix`` and
    ``max_connections``, and passes the rest of its query to redis-py.

    Raises:
        ConfigurationError: an unknown scheme, a bad option, or a missing optional dependency
            (with its ``pip install`` line).
    """
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme in ("redis", "rediss"):
        from asyncserve.jobs.redis import RedisBroker

        # Our options leave the URL; the rest (password, timeouts, ...) is for redis-py.
        rest, options = _pop_query(url, (*_COMMON_OPTIONS, "prefix", "max_connections"))
        redis_options: dict[str, Any] = {"prefix": options.pop("prefix", "asyncserve")}
        if "max_connections" in options:
            redis_options["max_connections"] = _whole_number(url, "max_connections", options.pop("max_connections"))
        return RedisBroker(rest, **redis_options, **_common_options(url, options))
    rest, options = _pop_query(url, _COMMON_OPTIONS)
    if unknown := urlsplit(rest).query:
        raise ConfigurationError(f"the broker URL {url!r} has options that {scheme or 'it'} does not take: {unknown!r}")
    if scheme == "memory":
        from asyncserve.jobs.memory import MemoryBroker

        return MemoryBroker(**_common_options(url, options))
    if scheme == "sqlite":
        from asyncserve.jobs.sqlite import SQLiteBroker

        return SQLiteBroker(_sqlite_path(url), **_common_options(url, options))
    raise ConfigurationError(f"no job broker for {url!r}; the supported URLs are: {'; '.join(SUPPORTED_URLS)}")


def _pop_query(url: str, names: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    """Take our own options out of a URL's query, leaving the rest for the driver."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    rest = urlencode([(name, value) for name, value in query if name not in names])
    return urlunsplit(parts._replace(query=rest)), {name: value for name, value in query if name in names}


def _common_options(url: str, options: dict[str, str]) -> dict[str, Any]:
    common: dict[str, Any] = {}
    if "max_queued" in options:
        raw = options["max_queued"]
        common["max_queued"] = None if raw.lower() in ("", "none") else _whole_number(url, "max_queued", raw)
    if "keep_expired_s" in options:
        raw = options["keep_expired_s"]
        try:
            common["keep_expired_s"] = float(raw)
        except ValueError:
            raise ConfigurationError(
                f"in the broker URL {url!r}, keep_expired_s must be a number of seconds, got {raw!r}"
            ) from None
    return common


def _whole_number(url: str, name: str, raw: str) -> int:
    if not raw.isdigit():
        raise ConfigurationError(f"in the broker URL {url!r}, {name} must be a whole number, got {raw!r}")
    return int(raw)


def _sqlite_path(url: str) -> str:
    # "sqlite:///var/jobs.db" is absolute, "sqlite://jobs.db" relative, as for the prediction log.
    path = url.split("://", 1)[1].split("?", 1)[0]
    if not path or path.endswith("/"):
        raise ConfigurationError(f"the broker URL {url!r} names no file; write it like {SUPPORTED_URLS[1]!r}")
    return path
