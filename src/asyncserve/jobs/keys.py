"""Every name that crosses a process boundary: what API processes and workers must agree on.

Producers (the HTTP API) and consumers (workers, possibly on other machines and other versions)
share nothing but a database. This module is the whole of that agreement, like arq's
``constants.py``: the job record's field names, the SQLite table names, and the Redis key layout.
Change a name here and every side changes with it; change it anywhere else and they drift apart.

The job record
--------------
``JOB_FIELDS`` are the fields of :class:`asyncserve.jobs.Job`, in order. They are the SQLite
columns, the Redis hash fields and the keys of ``Job.to_dict()``. JSON values (``inputs``,
``result``, ``webhook_attempts``) are stored as JSON text, booleans as ``0``/``1``, times as Unix
seconds; an absent value (None) is a SQL NULL or a missing hash field.

Redis key layout
----------------
``P`` is the prefix (``asyncserve`` unless the URL says ``?prefix=...``); one prefix is one
independent broker. Every key starts with ``P:``::

    P:job:{id}              HASH    the job record: JOB_FIELDS, plus QUEUE_FIELD (its stream key)
                                    and ENTRY_FIELD (its stream entry id while queued or running)
    P:idem:{key}            STRING  idempotency key -> job id, for the jobs without an owner (SET
                                    inside the enqueue script)
    P:idem-of:{n}:{owner}:{key}
                            STRING  the same, for an owner's jobs; n is the owner's length in UTF-8
                                    bytes, so that no owner and key spell another's name
    P:queue:{model}:{p}     STREAM  the queue of one model at one priority p (0-9); each entry is
                                    {STREAM_ID_FIELD: job id}; consumer group GROUP; one consumer
                                    per worker id. Entries are deleted when their job leaves.
    P:queues                SET     every queue stream whose consumer group exists
    P:models                SET     every model that has had a job
    P:jobs                  ZSET    every job id (all scores 0: ordered by id, that is by creation)
    P:status:{status}       ZSET    job ids by status (scores 0)
    P:model:{model}         ZSET    job ids by model (scores 0)
    P:owner:{owner}         ZSET    job ids by owner (scores 0; jobs without an owner are in none)
    P:leases                ZSET    running job ids, scored by lease_expires_at
    P:delayed               ZSET    queued job ids waiting out a retry backoff, scored by not_before
    P:due                   ZSET    job ids scored by when expire() must next look at them
                                    (queue deadline, end of the result TTL, end of the tombstone)
    P:events                CHANNEL the id of every job that changed, published by the change

Times inside Redis come from the Redis server's clock (``TIME``), so workers on machines whose
clocks disagree still agree on leases, backoffs and TTLs.
"""

from __future__ import annotations

JOB_FIELDS = (
    "id",
    "model",
    "version",
    "inputs",
    "priority",
    "status",
    "result",
    "error",
    "dead_letter",
    "attempts",
    "max_attempts",
    "webhook",
    "webhook_attempts",
    "idempotency_key",
    "owner",
    "created_at",
    "updated_at",
    "started_at",
    "finished_at",
    "ttl_s",
    "not_before",
    "deadline_at",
    "lease_owner",
    "fencing_token",
    "lease_expires_at",
)
"""The job record's fields, in ``Job``'s order."""

# --- SQLite -----------------------------------------------------------------------------------

SQLITE_JOBS_TABLE = "jobs"
"""One row per job; the columns are JOB_FIELDS plus ``due_at`` (when expire() next looks at it).

(``idempotency_key``, ``owner``) is unique, a missing owner counting as one owner."""
SQLITE_COUNTS_TABLE = "job_counts"
"""Jobs per status, kept by triggers, so stats() and the queue bound cost one lookup."""

# --- Redis ------------------------------------------------------------------------------------

DEFAULT_PREFIX = "asyncserve"
SEPARATOR = ":"
GROUP = "workers"
"""The consumer group on every queue stream."""
STREAM_ID_FIELD = "id"
"""The one field of a queue stream entry: the job id."""
QUEUE_FIELD = "queue"
ENTRY_FIELD = "entry"

JOB = "job"
IDEMPOTENCY = "idem"
OWNED_IDEMPOTENCY = "idem-of"
QUEUE = "queue"
QUEUES = "queues"
MODELS = "models"
JOBS = "jobs"
STATUS = "status"
MODEL = "model"
OWNER = "owner"
LEASES = "leases"
DELAYED = "delayed"
DUE = "due"
EVENTS = "events"


def key(prefix: str, *parts: str | int) -> str:
    """``prefix:part:part...``, the shape of every Redis name above."""
    return SEPARATOR.join((prefix, *(str(part) for part in parts)))


def job_key(prefix: str, job_id: str) -> str:
    return key(prefix, JOB, job_id)


def idempotency_key(prefix: str, idempotency_key: str, owner: str | None = None) -> str:
    """Where the job id of ``owner``'s ``idempotency_key`` is kept: one namespace per owner."""
    if owner is None:
        return key(prefix, IDEMPOTENCY, idempotency_key)
    # The owner's length first (in bytes, as Lua counts it): "a", "b:c" and "a:b", "c" differ.
    return key(prefix, OWNED_IDEMPOTENCY, len(owner.encode()), owner, idempotency_key)


def queue_key(prefix: str, model: str, priority: int) -> str:
    return key(prefix, QUEUE, model, priority)


def status_key(prefix: str, status: str) -> str:
    return key(prefix, STATUS, status)


def model_key(prefix: str, model: str) -> str:
    return key(prefix, MODEL, model)


def owner_key(prefix: str, owner: str) -> str:
    return key(prefix, OWNER, owner)


def events_channel(prefix: str) -> str:
    return key(prefix, EVENTS)
